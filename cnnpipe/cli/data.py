"""Commands over the dataset store: `ingest` adds images to a dataset, `datasets` lists, shows and verifies them."""

from __future__ import annotations

import click

from cnnpipe.cli.common import LISTING_FORMATS, before_flows, print_markdown
from cnnpipe.errors import CnnpipeError


@click.command()
@click.argument("source")
@click.option("--dataset", required=True, help="Dataset to add the images to (created if new).")
@click.option("--val-fraction", default=0.1, show_default=True,
              help="Share of unsplit images for validation; also of train/ images when the source has no val/.")
@click.option("--test-fraction", default=0.1, show_default=True, help="Share of unsplit images for test.")
@click.option("--resize", type=int, default=None,
              help="Shorter side to N, then centre N x N crop, stored as JPEG (the paper uses 256). Default: keep originals.")
@click.option("--workers", type=int, default=None, help="Decoding processes (default: one per core; 0: none).")
@click.option("--max-reject-fraction", default=0.5, show_default=True,
              help="Fail the run when more than this share of files is rejected.")
@click.option("--ray-address", envvar="CNNPIPE_RAY_ADDRESS", default=None,
              help="Shard the source over this Ray cluster (HOST:PORT, or ray://HOST:PORT) [env: CNNPIPE_RAY_ADDRESS].")
@click.option("--shards", type=int, default=None, help="Shards on Ray [default: one per CPU of the cluster].")
@click.option("--relabel", is_flag=True,
              help="Correct the labels of images already in the dataset to those SOURCE gives, as a new version "
                   "(adds no images; each keeps its split).")
@click.option("--new-class", "new_classes", multiple=True, metavar="LABEL",
              help="With --relabel: a class the correction may introduce (repeatable); other labels that are "
                   "not classes of the dataset are rejected as unknown_class.")
def ingest(source: str, dataset: str, val_fraction: float, test_fraction: float, resize: int | None,
           workers: int | None, max_reject_fraction: float, ray_address: str | None, shards: int | None,
           relabel: bool, new_classes: tuple[str, ...]) -> None:
    """Add the images in SOURCE to a versioned, deduplicated Parquet dataset.

    SOURCE is a folder of <class>/<file> or <split>/<class>/<file>, a .tar, .tar.gz or
    .zip of the same, or a CSV manifest with path,label[,split] columns; local or any
    fsspec URL (file://, s3://, gs://). Rerunning adds only new images. The store
    itself lives under $CNNPIPE_HOME, or at $CNNPIPE_DATASETS_URL (e.g. s3://bucket/datasets).

    With --relabel, SOURCE corrects labels instead: images already in the dataset (named by
    the manifest's sha256 column, or by their bytes) take the label it gives them in a new
    version; earlier versions keep the old ones. The labels.csv of `cnnpipe review export`
    is such a manifest.

    \b
    Examples:
      cnnpipe ingest ./photos --dataset pets
      cnnpipe ingest train.tar.gz --dataset pets --resize 256
      cnnpipe ingest labels.csv --dataset pets --val-fraction 0.2 --test-fraction 0
      cnnpipe ingest s3://bucket/photos.tar --dataset pets --ray-address 10.0.0.1:6379
      cnnpipe ingest review/labels.csv --dataset pets --relabel
    """
    from cnnpipe.reports.markdown import ingest_markdown
    from cnnpipe.sources import open_source
    from flows.ingest import ingest as ingest_flow

    open_source(source)  # a missing or unknown source fails here, in one line
    if new_classes and not relabel:
        raise CnnpipeError(f"{source}: --new-class only applies with --relabel; an ingest takes any label")
    if relabel:
        from cnnpipe.store import DatasetStore

        if not DatasetStore(dataset).exists():
            raise CnnpipeError(f"{source}: no dataset named {dataset!r} to relabel; ingest the images without "
                               "--relabel first (`cnnpipe datasets` lists the datasets)")
    before_flows()
    summary = ingest_flow(source=source, dataset=dataset, val_fraction=val_fraction, test_fraction=test_fraction,
                          resize=resize, workers=workers, max_reject_fraction=max_reject_fraction,
                          ray_address=ray_address, shards=shards, relabel=relabel, new_classes=new_classes)
    print_markdown(ingest_markdown(summary) + "".join(f"{line}\n" for line in summary.relabel_lines()))


@click.group(invoke_without_command=True)
@click.option("--format", "output_format", type=click.Choice(LISTING_FORMATS), default="table", show_default=True)
@click.pass_context
def datasets(ctx: click.Context, output_format: str) -> None:
    """List datasets with their versions and counts; `datasets show NAME` for details,
    `datasets verify NAME` to check every image."""
    if ctx.invoked_subcommand is not None:
        return
    from cnnpipe.reports.output import write_rows
    from cnnpipe.settings import get_settings
    from cnnpipe.store import list_datasets

    manifests = list_datasets()
    if not manifests:
        # A script reading --format json or csv still gets a valid, empty document on stdout.
        click.echo(f"No datasets under {get_settings().datasets_url} yet. Try: cnnpipe ingest SOURCE --dataset NAME",
                   err=output_format != "table")
        if output_format == "table":
            return
    rows = []
    for m in manifests:
        split_sizes = [f"{sum(m['counts'].get(s, {}).values()):,}" for s in ("train", "val", "test")]
        rows.append((m["name"], str(m["version"]), m["version_id"], f"{m['num_rows']:,}", str(len(m["classes"])),
                     *split_sizes))
    write_rows(["dataset", "version", "id", "images", "classes", "train", "val", "test"], rows, output_format)


@datasets.command("show")
@click.argument("name")
def datasets_show(name: str) -> None:
    """Show one dataset: versions, classes, counts per split, rejected inputs, and any part
    whose Parquet footer does not read."""
    from cnnpipe.reports.markdown import dataset_markdown

    store = _stored_dataset(name)
    damaged = store.verify()
    print_markdown(dataset_markdown(store, damaged))
    _fail_if_damaged(name, damaged)


@datasets.command("verify")
@click.argument("name")
def datasets_verify(name: str) -> None:
    """Read every Parquet part of a dataset: its footer, and each row's image against its SHA-256
    (an image that ingest converted or resized: a full decode, against its perceptual hash).

    Reads the whole dataset. Exits 1 if a part is damaged, after saying how to repair it."""
    from cnnpipe.reports.markdown import verification_markdown

    store = _stored_dataset(name)
    damaged = store.verify(read_rows=True)
    print_markdown(verification_markdown(store, damaged))
    _fail_if_damaged(name, damaged)


def _stored_dataset(name: str):
    from cnnpipe.store import DatasetStore

    store = DatasetStore(name)
    if not store.exists():
        raise CnnpipeError(f"no dataset named {name!r}; `cnnpipe datasets` lists them")
    return store


def _fail_if_damaged(name: str, damaged: list) -> None:
    if damaged:
        raise CnnpipeError(f"dataset {name}: {len(damaged)} damaged Parquet part{'s' if len(damaged) != 1 else ''}, "
                           "listed above with how to repair them")


COMMANDS = (ingest, datasets)
