"""Commands over the predictions database: `classify` fills it, `sql` queries it read-only, `monitor` shows drift."""

from __future__ import annotations

from pathlib import Path

import click

from cnnpipe.cli.common import before_flows, print_markdown
from cnnpipe.errors import CnnpipeError
from cnnpipe.settings import REGISTERED_MODEL


@click.command()
@click.argument("source")
@click.option("--model", "model_ref", default=f"{REGISTERED_MODEL}@champion", show_default=True,
              help="Registered model: NAME@ALIAS or NAME/VERSION (models:/ optional).")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="Use a checkpoint file from `cnnpipe train` instead of the registry.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--ray-address", envvar="CNNPIPE_RAY_ADDRESS", default=None,
              help="Shard the source over this Ray cluster (HOST:PORT, or ray://HOST:PORT) [env: CNNPIPE_RAY_ADDRESS].")
@click.option("--shards", type=int, default=None, help="Shards on Ray [default: one per GPU, else per CPU].")
def classify(source: str, model_ref: str, checkpoint: str | None, device: str, batch_size: int,
             ray_address: str | None, shards: int | None) -> None:
    """Classify the images in SOURCE into the predictions database.

    SOURCE takes the same forms as `cnnpipe ingest`, or `dataset:NAME[/SPLIT]` for a
    dataset of the store; labels in it are ignored. The
    model is resolved once, and its version is written into every row. Images this
    version already classified are skipped before decoding, so rerunning adds
    nothing, and a run killed at any point finishes on rerun. Query the results
    with `cnnpipe sql`.

    \b
    Examples:
      cnnpipe classify ./inbox
      cnnpipe classify archive.tar.gz --model cnn-classifier/3 --device cuda --batch-size 1024
      cnnpipe classify s3://bucket/photos/ --model models:/cnn-classifier@challenger
      cnnpipe classify dataset:cifar10/test --model cnn-classifier/3
      cnnpipe classify archive.tar --ray-address 10.0.0.1:6379    # shards on a Ray cluster
      cnnpipe classify ./inbox --checkpoint .cnnpipe/checkpoints/cifar10__alexnet-cifar/RUN/epoch-0030.pt
    """
    from cnnpipe.models.refs import parse_model_ref
    from cnnpipe.predictions.classify import open_classify_source
    from cnnpipe.reports.markdown import classify_markdown
    from flows.classify import classify as classify_flow

    if not checkpoint:
        parse_model_ref(model_ref)  # a malformed reference fails here, in one line
    _check_device_and_checkpoint(device, checkpoint)
    open_classify_source(source)
    before_flows()
    summary = classify_flow(source=source, model=model_ref, checkpoint=checkpoint, device=device, batch_size=batch_size,
                            ray_address=ray_address, shards=shards)
    print_markdown(classify_markdown(summary))


def _check_device_and_checkpoint(device: str, checkpoint: str | None) -> None:
    """A device this machine lacks, or a file that is not a checkpoint, in one line before the flow
    starts: inside it, either failed with the flow's tracebacks."""
    from cnn.checkpoint import CheckpointError, load_checkpoint
    from cnn.device import resolve_device

    try:
        resolve_device(device)
        if checkpoint:
            load_checkpoint(checkpoint)
    except (ValueError, CheckpointError) as exc:
        raise click.ClickException(str(exc)) from None


@click.command()
@click.argument("query")
@click.option("--format", "output_format", type=click.Choice(["table", "csv", "json", "parquet"]), default="table",
              show_default=True)
@click.option("--output", type=click.Path(dir_okay=False, writable=True),
              help="Write here instead of the terminal; never inside $CNNPIPE_HOME.")
@click.option("--force", is_flag=True, help="Replace --output if it exists.")
@click.option("--max-rows", default=1000, show_default=True, help="Row cap for table output.")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds before the query is stopped (its process is killed).")
def sql(query: str, output_format: str, output: str | None, force: bool, max_rows: int, timeout: float) -> None:
    """Run one read-only SELECT against the predictions database.

    The connection cannot write, read files, reach the network, load extensions
    or change its settings; memory, threads and time are capped.

    \b
    Tables: predictions, embeddings, classify_runs, rejected_inputs, promotions, champions,
    ground_truth, reference_profiles, reference_classes, reference_confidence, drift_thresholds,
    and what `cnnpipe audit` finds: near_duplicates, label_issues, outliers.
    Views:
      latest_predictions  per image, the champion's prediction, else the newest version's
      class_counts        images per day, model version and label
      low_confidence      latest predictions with confidence below 0.5
      disagreements       images that two versions of one model label differently
      production_accuracy measured top-1 per model version and day, from labels ingested later
      drift_by_run        drift of each classify run against the model's reference (cnnpipe monitor)
      drift_daily         the same per model version and day
      reference_embeddings each version's mean and spread of its held-out images' embeddings
    Macro: similar_images(sha256, model_name, model_version, k), as `cnnpipe similar` searches.

    \b
    Examples:
      cnnpipe sql "SELECT label, sum(images) FROM class_counts WHERE day >= current_date - 7 GROUP BY label"
      cnnpipe sql "SELECT member_path, label, confidence FROM low_confidence ORDER BY confidence LIMIT 20"
      cnnpipe sql "SELECT * FROM disagreements" --format csv --output disagreements.csv
      cnnpipe sql "SELECT * FROM predictions" --format parquet --output predictions.parquet --force
    """
    from cnnpipe.predictions.sql import QueryLimits, run_query
    from cnnpipe.reports.output import check_output, write_result
    from cnnpipe.settings import get_settings

    if output_format == "parquet" and not output:
        raise CnnpipeError("--format parquet needs --output FILE")
    if output:
        check_output(output, force)  # before the query, which may run for minutes
    limits = QueryLimits(timeout_seconds=timeout, max_rows=max_rows)
    result = run_query(query, get_settings().predictions_db, limits, cap_rows=output_format == "table")
    write_result(result, output_format, output, force=force)
    if output:
        click.echo(f"{len(result.rows):,} row{'s' if len(result.rows) != 1 else ''} written to {output} "
                   f"({output_format})", err=True)


@click.command()
@click.argument("image")
@click.option("--model", "model_ref", default=f"{REGISTERED_MODEL}@champion", show_default=True,
              help="NAME@champion, NAME/VERSION or NAME (its newest version holding the image).")
@click.option("--k", default=10, show_default=True, type=click.IntRange(1, 10_000), help="How many neighbours.")
@click.option("--dataset", default=None, help="Only images of this dataset, with their labels and split "
              "(classify it first: `cnnpipe classify dataset:NAME`) [default: every classified image].")
@click.option("--format", "output_format", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True)
@click.option("--export", "export_to", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write the neighbours' images and labels.csv into this folder, as `review export` does.")
def similar(image: str, model_ref: str, k: int, dataset: str | None, output_format: str,
            export_to: Path | None) -> None:
    """The k classified images most like IMAGE (a file, or the SHA-256 of a classified image).

    Distances are cosine distances between the embeddings one model version gave the images it
    classified (`cnnpipe classify` stores them in the `embeddings` table), found by a full scan
    in DuckDB. An image the model has not classified is embedded first, with the registered
    version. In `cnnpipe sql`, the same search is the table macro
    `similar_images(sha256, model_name, model_version, k)`.

    \b
    Examples:
      cnnpipe similar ./inbox/cat.jpg
      cnnpipe similar ./inbox/cat.jpg --dataset pets --export ./look   # its twins in the training data
      cnnpipe similar 3b1f...e9 --model cnn-classifier/4 --k 20 --format csv
      cnnpipe sql "SELECT s.*, p.label FROM similar_images('3b1f...e9', 'cnn-classifier', '4', 5) s JOIN latest_predictions p USING (image_sha256)"
    """
    from cnnpipe.predictions.similar import dataset_images, embed_image, image_key, nearest, stored_version
    from cnnpipe.reports.output import write_result
    from cnnpipe.settings import get_settings

    settings = get_settings()
    database = settings.predictions_db
    sha, data = image_key(image)
    images = dataset_images(dataset, settings) if dataset else None
    model_ref = _as_stored(model_ref)
    stored = stored_version(database, sha, model_ref)
    if stored is not None:
        name, version, embedding = *stored, None
    elif data is None:
        raise click.ClickException(f"{sha}: {model_ref} has classified no image with this SHA-256; give the file")
    else:
        name, version, embedding = embed_image(data, model_ref)
    result = nearest(database, sha, name, version, k, embedding, images)
    if dataset and not result.rows:
        raise click.ClickException(f"no image of dataset {dataset} has an embedding by {name}/{version}: classify "
                                   f"it first with `cnnpipe classify dataset:{dataset} --model {name}/{version}`")
    write_result(result, output_format, None, count_rows=False)
    if export_to is not None:
        _export_neighbours(result, name, version, export_to, settings)


def _as_stored(model_ref: str) -> str:
    """A reference the predictions database can look up: it keeps the champion of each model, so
    any other alias (`@challenger`) is resolved to NAME/VERSION in the registry first."""
    from cnnpipe.models.refs import CHAMPION, parse_model_ref

    ref = parse_model_ref(model_ref) if "@" in model_ref else None
    if ref is None or ref.alias == CHAMPION:
        return model_ref
    from cnnpipe.models.registry import client, resolve

    return f"{ref.name}/{resolve(client(), ref).version}"


def _export_neighbours(result, name: str, version: str, folder: Path, settings) -> None:
    from cnnpipe.monitoring.review import export_for_review
    from cnnpipe.predictions.similar import prediction_rows

    export = export_for_review(prediction_rows(settings.predictions_db, [row[0] for row in result.rows], name,
                                               version), folder, settings)
    click.echo(f"exported {export.from_source + export.from_store} images to {folder} (labels.csv lists them, "
               f"nearest first){f'; {len(export.unavailable)} unavailable' if export.unavailable else ''}", err=True)


@click.group(invoke_without_command=True)
@click.option("--model", "model_ref", default=None,
              help="NAME, NAME/VERSION or NAME@champion [default: every model with a reference profile].")
@click.option("--since", type=click.DateTime(["%Y-%m-%d"]), default=None, help="Only batches from this day on.")
@click.option("--daily", is_flag=True, help="One row per model version and day instead of one per classify run.")
@click.option("--format", "output_format", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True)
@click.pass_context
def monitor(ctx: click.Context, model_ref: str | None, since, daily: bool, output_format: str) -> None:
    """Drift of each classify run (or day) against the model's reference profile.

    Columns as in the views drift_by_run and drift_daily: the population stability index
    and Jensen-Shannon distance of the predicted classes, the accuracy estimated from
    calibrated confidence, confidence, rejected-input, size and brightness shifts, how far the
    batch's mean embedding lies from the reference's (in its standard deviations), and `alert`
    when one passes its threshold (`cnnpipe monitor thresholds`).

    \b
    Examples:
      cnnpipe monitor
      cnnpipe monitor --model cnn-classifier@champion --since 2026-12-01
      cnnpipe monitor --daily --format csv | grep true
      cnnpipe monitor thresholds --set psi=0.1
    """
    if ctx.invoked_subcommand:
        return
    from cnnpipe.predictions.records import version_condition
    from cnnpipe.predictions.sql import QueryLimits, run_query
    from cnnpipe.reports.output import write_result
    from cnnpipe.settings import get_settings

    view, key = ("drift_daily", "day") if daily else ("drift_by_run", "classify_run_id")
    conditions = [version_condition(model_ref, "d")] if model_ref else []
    if since:
        time = "day" if daily else "(SELECT finished_at FROM classify_runs r WHERE r.classify_run_id = d.classify_run_id)"
        conditions.append(f"{time} >= DATE '{since:%Y-%m-%d}'")
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    query = (f"SELECT {key}, model_name AS model, model_version AS version, images, round(psi, 3) AS psi, "
             "round(js_distance, 3) AS js, round(estimated_accuracy, 3) AS est_accuracy, "
             "round(confidence_shift, 3) AS confidence_shift, round(low_confidence_share, 3) AS low_confidence, "
             "round(rejected_rate, 3) AS rejected, round(size_shift, 3) AS size_shift, "
             f"round(brightness_shift, 3) AS brightness_shift, round(embedding_shift, 3) AS embedding_shift, "
             f"alert FROM {view} d {where} ORDER BY {key}")
    result = run_query(query, get_settings().predictions_db, QueryLimits(), cap_rows=False)
    if not result.rows:
        click.echo("No drift to show: classify with a model registered since monitoring began (it keeps a "
                   "reference profile).", err=output_format != "table")
        if output_format == "table":
            return
    write_result(result, output_format, None, count_rows=False)


@monitor.command()
@click.option("--set", "assignments", multiple=True, metavar="METRIC=VALUE",
              help="Change one threshold; repeat for more. All are checked before any is written.")
@click.option("--format", "output_format", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True)
def thresholds(assignments: tuple[str, ...], output_format: str) -> None:
    """The threshold past which each drift figure alerts, or change them with --set.

    \b
    Examples:
      cnnpipe monitor thresholds
      cnnpipe monitor thresholds --set psi=0.1 --set brightness_shift=0.05
    """
    from cnnpipe.predictions.database import set_drift_thresholds
    from cnnpipe.predictions.sql import QueryLimits, run_query
    from cnnpipe.reports.output import write_result
    from cnnpipe.settings import get_settings

    database = get_settings().predictions_db
    if assignments:
        for metric, old, new in set_drift_thresholds(database, assignments):
            click.echo(f"{metric}: {old:g} -> {new:g}" if new != old else f"{metric}: {new:g} (unchanged)")
        return
    result = run_query("SELECT metric, threshold, meaning FROM drift_thresholds ORDER BY metric", database,
                       QueryLimits(), cap_rows=False)
    write_result(result, output_format, None, count_rows=False)


COMMANDS = (classify, sql, similar, monitor)
