"""The `cnnpipe` command: a few lines per command over the library.

Heavy imports (torch, prefect, mlflow) happen inside the commands that need them, so
`cnnpipe --help` answers at once.
"""

from __future__ import annotations

import os
import sys

import click

from cnnpipe.errors import CnnpipeError


class _Cli(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (CnnpipeError, FileNotFoundError, PermissionError) as exc:
            raise click.ClickException(str(exc)) from None


def _print_markdown(text: str) -> None:
    from rich.console import Console
    from rich.markdown import Markdown

    Console().print(Markdown(text))


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="cnn-pipeline")
def cli() -> None:
    """Image classification pipeline: ingest, train, classify, and query in SQL.

    State lives under $CNNPIPE_HOME (default ./.cnnpipe). ingest, train and classify
    run as Prefect flows: on Prefect's ephemeral API, or on the server at $PREFECT_API_URL.

    \b
    Examples:
      cnnpipe demo                                   # the whole chain on rendered shapes
      cnnpipe ingest cifar10-jpeg.tar.gz --dataset cifar10
      cnnpipe datasets show cifar10
      cnnpipe train --dataset cifar10 --epochs 30
      cnnpipe classify ./inbox --checkpoint .cnnpipe/checkpoints/cifar10__alexnet-cifar/RUN/epoch-0030.pt
      cnnpipe sql "SELECT label, count(*) FROM latest_predictions GROUP BY label"
    """


@cli.command()
@click.argument("source")
@click.option("--dataset", required=True, help="Dataset to add the images to (created if new).")
@click.option("--val-fraction", default=0.1, show_default=True, help="Share of unsplit images for validation.")
@click.option("--test-fraction", default=0.1, show_default=True, help="Share of unsplit images for test.")
@click.option("--resize", type=int, default=None,
              help="Shorter side to N, then centre N x N crop, stored as JPEG (the paper uses 256). Default: keep originals.")
@click.option("--workers", type=int, default=None, help="Decoding processes (default: one per core; 0: none).")
@click.option("--max-reject-fraction", default=0.5, show_default=True,
              help="Fail the run when more than this share of files is rejected.")
def ingest(source: str, dataset: str, val_fraction: float, test_fraction: float, resize: int | None,
           workers: int | None, max_reject_fraction: float) -> None:
    """Add the images in SOURCE to a versioned, deduplicated Parquet dataset.

    SOURCE is a folder of <class>/<file> or <split>/<class>/<file>, a .tar, .tar.gz or
    .zip of the same, or a CSV manifest with path,label[,split] columns; local or any
    fsspec URL (file://, memory://, s3://). Rerunning adds only new images.

    \b
    Examples:
      cnnpipe ingest ./photos --dataset pets
      cnnpipe ingest train.tar.gz --dataset pets --resize 256
      cnnpipe ingest labels.csv --dataset pets --val-fraction 0.2 --test-fraction 0
    """
    from cnnpipe.reports import ingest_markdown
    from cnnpipe.sources import open_source
    from flows.ingest import ingest as ingest_flow

    open_source(source)  # a missing or unknown source fails here, in one line
    summary = ingest_flow(source=source, dataset=dataset, val_fraction=val_fraction, test_fraction=test_fraction,
                          resize=resize, workers=workers, max_reject_fraction=max_reject_fraction)
    _print_markdown(ingest_markdown(summary))


@cli.command()
@click.option("--dataset", required=True, help="Dataset in the store to train on.")
@click.option("--model", default="alexnet-cifar", show_default=True,
              help="alexnet (224x224), alexnet-cifar (32x32), or a torchvision model name such as resnet18.")
@click.option("--epochs", default=30, show_default=True)
@click.option("--batch-size", default=512, show_default=True)
@click.option("--lr", default=0.2, show_default=True, help="Peak learning rate (one-cycle) or starting rate.")
@click.option("--schedule", type=click.Choice(["onecycle", "plateau", "step", "cosine"]), default="onecycle",
              show_default=True, help="plateau is the paper's: divide by 10 when validation stops improving.")
@click.option("--norm", type=click.Choice(["lrn", "batch", "none"]), default=None,
              help="Normalisation layers [default: batch for alexnet-cifar, lrn for alexnet].")
@click.option("--dropout", default=0.5, show_default=True)
@click.option("--label-smoothing", default=0.1, show_default=True)
@click.option("--patience", type=int, default=None, help="Stop after this many epochs without a better val top-1.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--memory-budget-mb", default=2048, show_default=True,
              help="Decode a split once into device memory when it fits; stream row groups otherwise.")
@click.option("--ten-crop", is_flag=True, help="Also report the paper's ten-patch test-time averaging.")
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the model.")
@click.option("--resume", is_flag=False, flag_value="latest", default=None, metavar="[PATH]",
              help="Continue the latest unfinished run of this dataset and model, or the run at PATH.")
def train(dataset: str, model: str, epochs: int, batch_size: int, lr: float, schedule: str, norm: str | None,
          dropout: float, label_smoothing: float, patience: int | None, seed: int, device: str,
          memory_budget_mb: int, ten_crop: bool, compile_model: bool, resume: str | None) -> None:
    """Train a CNN on a dataset of the store, with a checkpoint every epoch.

    Prints the validation top-1 each epoch and, at the end, the held-out top-1 and
    top-5 (the test split when the dataset has one, else validation). The defaults
    are the alexnet-cifar recipe: SGD with momentum 0.9, weight decay 5e-4, one-cycle
    learning rate, label smoothing 0.1, batch norm.

    \b
    Examples:
      cnnpipe train --dataset cifar10 --epochs 30
      cnnpipe train --dataset cifar10 --model alexnet-cifar --norm lrn --schedule plateau
      cnnpipe train --dataset imagenet --model alexnet --device cuda --ten-crop
      cnnpipe train --dataset cifar10 --resume          # after a crash or kill -9
    """
    from flows.train import train as train_flow

    result = train_flow(dataset=dataset, model=model, epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule,
                        label_smoothing=label_smoothing, norm=norm, dropout=dropout, patience=patience, seed=seed,
                        device=device, memory_budget_mb=memory_budget_mb, ten_crop=ten_crop, compile=compile_model,
                        resume=True if resume == "latest" else (resume or False))
    _print_training(result)


def _print_training(result) -> None:
    held = result.held_out
    click.echo(f"\nheld-out ({result.held_out_split}, {held['images']:,} images): top-1 {100 * held['top1']:.1f}% "
               f"(error {100 * (1 - held['top1']):.1f}%), top-5 {100 * held['top5']:.1f}%")
    if "ten_crop_top1" in held:
        click.echo(f"ten-patch averaging: top-1 {100 * held['ten_crop_top1']:.1f}%, top-5 {100 * held['ten_crop_top5']:.1f}%")
    click.echo(f"checkpoint: {result.checkpoint}")


@cli.command()
@click.argument("source")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="A checkpoint from `cnnpipe train` (registry models arrive with the MLflow registry).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--batch-size", default=256, show_default=True)
def classify(source: str, checkpoint: str | None, device: str, batch_size: int) -> None:
    """Classify the images in SOURCE into the predictions database.

    SOURCE takes the same forms as `cnnpipe ingest`; labels in it are ignored.
    Images this model version already classified are skipped before decoding, so
    rerunning adds nothing, and a run killed at any point finishes on rerun.
    Query the results with `cnnpipe sql`.

    \b
    Examples:
      cnnpipe classify ./inbox --checkpoint .cnnpipe/checkpoints/cifar10__alexnet-cifar/RUN/epoch-0030.pt
      cnnpipe classify archive.tar.gz --checkpoint model.pt --device cuda --batch-size 1024
    """
    from cnnpipe.reports import classify_markdown
    from cnnpipe.sources import open_source
    from flows.classify import classify as classify_flow

    if checkpoint is None:
        raise CnnpipeError("give --checkpoint PATH: classifying with a registered model needs the MLflow registry")
    open_source(source)
    summary = classify_flow(source=source, checkpoint=checkpoint, device=device, batch_size=batch_size)
    _print_markdown(classify_markdown(summary))


@cli.command()
@click.argument("query")
@click.option("--format", "output_format", type=click.Choice(["table", "csv", "json", "parquet"]), default="table",
              show_default=True)
@click.option("--output", type=click.Path(dir_okay=False, writable=True), help="Write here instead of the terminal.")
@click.option("--max-rows", default=1000, show_default=True, help="Row cap for table output.")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds before the query is interrupted.")
def sql(query: str, output_format: str, output: str | None, max_rows: int, timeout: float) -> None:
    """Run one read-only SELECT against the predictions database.

    The connection cannot write, read files, reach the network, load extensions
    or change its settings; memory, threads and time are capped.

    \b
    Tables: predictions, classify_runs, rejected_inputs, promotions, champions.
    Views:
      latest_predictions  per image, the champion's prediction, else the newest version's
      class_counts        images per day, model version and label
      low_confidence      latest predictions with confidence below 0.5
      disagreements       images that two versions of one model label differently

    \b
    Examples:
      cnnpipe sql "SELECT label, sum(images) FROM class_counts WHERE day >= current_date - 7 GROUP BY label"
      cnnpipe sql "SELECT member_path, label, confidence FROM low_confidence ORDER BY confidence LIMIT 20"
      cnnpipe sql "SELECT * FROM disagreements" --format csv --output disagreements.csv
      cnnpipe sql "SELECT * FROM predictions" --format parquet --output predictions.parquet
    """
    from cnnpipe.output import write_result
    from cnnpipe.settings import get_settings
    from cnnpipe.sql import QueryLimits, run_query

    if output_format == "parquet" and not output:
        raise CnnpipeError("--format parquet needs --output FILE")
    limits = QueryLimits(timeout_seconds=timeout, max_rows=max_rows)
    result = run_query(query, get_settings().predictions_db, limits, cap_rows=output_format == "table")
    write_result(result, output_format, output)


@cli.group(invoke_without_command=True)
@click.pass_context
def datasets(ctx: click.Context) -> None:
    """List datasets with their versions and counts; `datasets show NAME` for details."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.console import Console
    from rich.table import Table

    from cnnpipe.settings import get_settings
    from cnnpipe.store import list_datasets

    manifests = list_datasets()
    if not manifests:
        click.echo(f"No datasets under {get_settings().datasets_dir} yet. Try: cnnpipe ingest SOURCE --dataset NAME")
        return
    table = Table("dataset", "version", "id", "images", "classes", "train", "val", "test")
    for m in manifests:
        split_sizes = [f"{sum(m['counts'].get(s, {}).values()):,}" for s in ("train", "val", "test")]
        table.add_row(m["name"], str(m["version"]), m["version_id"], f"{m['num_rows']:,}", str(len(m["classes"])), *split_sizes)
    Console().print(table)


@datasets.command("show")
@click.argument("name")
def datasets_show(name: str) -> None:
    """Show one dataset: versions, classes, counts per split and rejected inputs."""
    from cnnpipe.reports import dataset_markdown
    from cnnpipe.store import DatasetStore

    store = DatasetStore(name)
    if not store.exists():
        raise CnnpipeError(f"no dataset named {name!r}; `cnnpipe datasets` lists them")
    _print_markdown(dataset_markdown(store))


@cli.command()
def demo() -> None:
    """Make a small image set and run the pipeline over it.

    Writes rendered shapes (JPEG and PNG in class folders, two deliberately broken
    files, and a tar archive of more images) under $CNNPIPE_HOME/demo, ingests the
    folder and the archive into the dataset `shapes`, trains alexnet-cifar on it for
    12 epochs on the CPU (about a minute), classifies the archive into DuckDB and
    ends with a SQL query over the predictions.
    """
    from cnnpipe.demo import write_demo_images
    from cnnpipe.reports import ingest_markdown
    from cnnpipe.settings import get_settings
    from cnnpipe.output import write_result
    from cnnpipe.reports import classify_markdown
    from cnnpipe.sql import run_query
    from flows.classify import classify as classify_flow
    from flows.ingest import ingest as ingest_flow
    from flows.train import train as train_flow

    settings = get_settings()
    folder, archive = write_demo_images(settings.demo_dir)
    for source in (folder, archive):
        summary = ingest_flow(source=str(source), dataset="shapes")
        _print_markdown(ingest_markdown(summary))
    result = train_flow(dataset="shapes", epochs=12, batch_size=32, lr=0.01, dropout=0.2)
    _print_training(result)
    summary = classify_flow(source=str(archive), checkpoint=result.checkpoint)
    _print_markdown(classify_markdown(summary))
    query = ("SELECT label, count(*) AS images, round(avg(confidence), 3) AS mean_confidence "
             "FROM latest_predictions GROUP BY label ORDER BY label")
    click.echo(f'\n$ cnnpipe sql "{query}"')
    write_result(run_query(query, settings.predictions_db), "table", None)
    files = settings.dataset_dir("shapes") / "**" / "*.parquet"
    click.echo("\nThe dataset is plain Parquet; DuckDB reads it with no cnnpipe involved:\n"
               f"  SELECT split, label, count(*) FROM '{files}' GROUP BY ALL ORDER BY ALL;\n"
               "Details: cnnpipe datasets show shapes")


def main() -> None:
    # The pipeline makes no outbound calls of its own; Prefect's usage telemetry stays off
    # unless the user turns it on.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Our own progress and warnings go to the same console and run logs as Prefect's.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "cnnpipe")
    cli(prog_name="cnnpipe")


if __name__ == "__main__":
    sys.exit(main())
