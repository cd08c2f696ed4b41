"""The `cnnpipe` command: a few lines per command over the library.

Heavy imports (torch, prefect, mlflow) happen inside the commands that need them, so
`cnnpipe --help` answers at once.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import click

from cnnpipe.errors import CnnpipeError
from cnnpipe.settings import REGISTERED_MODEL

DEMO_MODEL = "shapes-classifier"
# What `models` and `datasets` print: whole values always, piped or not.
LISTING_FORMATS = ("table", "csv", "json")


class _Cli(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (CnnpipeError, FileNotFoundError, PermissionError) as exc:
            raise click.ClickException(str(exc)) from None
        except Exception as exc:
            # A tracking server that is down or refuses a request: one line, not a traceback.
            if type(exc).__module__.startswith("mlflow"):
                raise click.ClickException(f"MLflow: {str(exc).splitlines()[0]}") from None
            raise


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
      cnnpipe models
      cnnpipe classify ./inbox                       # with cnn-classifier@champion
      cnnpipe sql "SELECT label, count(*) FROM latest_predictions GROUP BY label"
      cnnpipe serve --dataset cifar10 --source ./incoming --inbox ./inbox
    """


@cli.command()
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
def ingest(source: str, dataset: str, val_fraction: float, test_fraction: float, resize: int | None,
           workers: int | None, max_reject_fraction: float, ray_address: str | None, shards: int | None) -> None:
    """Add the images in SOURCE to a versioned, deduplicated Parquet dataset.

    SOURCE is a folder of <class>/<file> or <split>/<class>/<file>, a .tar, .tar.gz or
    .zip of the same, or a CSV manifest with path,label[,split] columns; local or any
    fsspec URL (file://, s3://, gs://). Rerunning adds only new images. The store
    itself lives under $CNNPIPE_HOME, or at $CNNPIPE_DATASETS_URL (e.g. s3://bucket/datasets).

    \b
    Examples:
      cnnpipe ingest ./photos --dataset pets
      cnnpipe ingest train.tar.gz --dataset pets --resize 256
      cnnpipe ingest labels.csv --dataset pets --val-fraction 0.2 --test-fraction 0
      cnnpipe ingest s3://bucket/photos.tar --dataset pets --ray-address 10.0.0.1:6379
    """
    from cnnpipe.reports import ingest_markdown
    from cnnpipe.sources import open_source
    from flows.ingest import ingest as ingest_flow

    open_source(source)  # a missing or unknown source fails here, in one line
    _before_flows()
    summary = ingest_flow(source=source, dataset=dataset, val_fraction=val_fraction, test_fraction=test_fraction,
                          resize=resize, workers=workers, max_reject_fraction=max_reject_fraction,
                          ray_address=ray_address, shards=shards)
    _print_markdown(ingest_markdown(summary))


def _before_flows() -> None:
    """What every command that runs flows needs first, after its cheap one-line checks: starting
    Prefect prints lines of its own, which a bad argument should never be preceded by."""
    _errors_in_one_line()
    _start_prefect_in_turn()


class _NoFlowErrors:
    """Drops a failing flow's or task's error records, traceback and all, from the terminal:
    the command ends with one `Error:` line, and the records stay in the run's logs."""

    def filter(self, record) -> bool:
        return not (record.levelno >= 40 and record.name.startswith(("prefect.flow_runs", "prefect.task_runs")))


def _errors_in_one_line() -> None:
    """For the commands that run flows, once Prefect has set up its console handler."""
    import logging

    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "PrefectConsoleHandler" and not any(
                isinstance(f, _NoFlowErrors) for f in handler.filters):
            handler.addFilter(_NoFlowErrors())


def _start_prefect_in_turn() -> None:
    """Start the ephemeral Prefect server that this command's flows will use, one process at a
    time: each start migrates Prefect's database, and two first starts at once on a fresh
    PREFECT_HOME collide ("index ... already exists"), as a cron starting two commands would."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    # Imported only now: Prefect's server app takes seconds to import, and a command that
    # talks to `cnnpipe server` never needs it.
    from prefect.server.api.server import SubprocessASGIServer

    from cnnpipe.locks import file_lock

    with file_lock(Path(PREFECT_HOME.value()) / "cnnpipe-server-start.lock",
                   waiting="waiting for another cnnpipe command to start Prefect's server"):
        SubprocessASGIServer().start()


def _auto(knob: str) -> str:
    from cnn.recipe import RULES

    return f"[default: auto: {RULES[knob]}]"


def _training_options(command):
    """The options `train`, `retrain` and `serve` share."""
    options = [
        click.option("--model", default="alexnet-cifar", show_default=True,
                     help="alexnet (224x224), alexnet-cifar (32x32), or a torchvision model name such as resnet18."),
        click.option("--epochs", type=int, default=None, help=_auto("epochs")),
        click.option("--batch-size", type=int, default=None, help=_auto("batch_size")),
        click.option("--lr", type=float, default=None,
                     help=f"Peak learning rate (one-cycle) or starting rate {_auto('lr')}."),
        click.option("--schedule", type=click.Choice(["onecycle", "plateau", "step", "cosine"]), default="onecycle",
                     show_default=True, help="plateau is the paper's: divide by 10 when validation stops improving. "
                     "onecycle also cycles SGD momentum from 0.95 down to 0.85 and back, in place of the fixed 0.9 "
                     "the other schedules use."),
        click.option("--norm", type=click.Choice(["lrn", "batch", "none"]), default=None,
                     help="Normalisation layers [default: batch for alexnet-cifar, lrn for alexnet]."),
        click.option("--dropout", type=float, default=None, help=_auto("dropout")),
        click.option("--weight-decay", type=float, default=None, help=_auto("weight_decay")),
        click.option("--label-smoothing", type=float, default=None, help=_auto("label_smoothing")),
        click.option("--patience", type=int, default=None, help="Stop after this many epochs without a better val top-1."),
        click.option("--seed", default=0, show_default=True),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option("--registered-model", default=REGISTERED_MODEL, show_default=True,
                     help="Name in the MLflow model registry."),
        click.option("--min-improvement", default=0.0, show_default=True,
                     help="Promote to champion only if validation top-1 beats the champion's by at least this."),
        click.option("--nproc", default=1, show_default=True,
                     help="Train as DDP over N processes on this machine (torchrun): one per GPU, or gloo on CPUs."),
        click.option("--memory-budget-mb", type=int, default=None,
                     help="Decode a split once into device memory when it fits; stream row groups otherwise "
                          "[default: auto: a share of the GPU's free memory, or of the RAM available on a CPU, said "
                          "in the run's log]."),
        click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True,
                     help="auto: bf16 autocast on CUDA and on CPUs with AMX (about 3x faster there), fp32 elsewhere."),
        click.option("--ten-crop", is_flag=True, help="Also report the paper's ten-patch test-time averaging."),
        click.option("--compile", "compile_model", is_flag=True, help="torch.compile the model."),
        click.option("--resume", is_flag=False, flag_value="latest", default=None, metavar="[PATH]",
                     help="Continue the latest unfinished run of this dataset and model, or the run at PATH."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.command()
@click.option("--dataset", required=True, help="Dataset in the store to train on.")
@_training_options
def train(dataset: str, compile_model: bool, resume: str | None, **options) -> None:
    """Train a CNN on a dataset of the store, log it to MLflow and register it.

    Prints the recipe first, the validation top-1 each epoch and, at the end, the
    held-out top-1 and top-5 (the test split when the dataset has one, else
    validation). The new version becomes `challenger`, and `champion` only if its
    validation top-1 clearly beats the champion's and the majority class. SGD with
    momentum 0.9 and a one-cycle learning rate; batch size, learning rate, epochs and
    regularisation are chosen for the size of the train split unless given (at
    50,000 images: batch 512, lr 0.2, 30 epochs, dropout 0.5, as for CIFAR-10).

    \b
    Examples:
      cnnpipe train --dataset pets                      # the automatic recipe
      cnnpipe train --dataset cifar10 --epochs 30 --batch-size 256 --lr 0.1
      cnnpipe train --dataset cifar10 --model alexnet-cifar --norm lrn --schedule plateau
      cnnpipe train --dataset imagenet --model alexnet --device cuda --ten-crop
      cnnpipe train --dataset cifar10 --resume          # after a crash or kill -9
      cnnpipe train --dataset imagenet --model alexnet --nproc 8   # DDP on 8 GPUs
    """
    from flows.train import train as train_flow

    resume = True if resume == "latest" else (resume or False)
    _check_training(dataset, resume, options)
    _before_flows()
    _print_training(train_flow(dataset=dataset, compile=compile_model, resume=resume, **options))


def _check_training(dataset: str, resume: bool | str, options: dict) -> None:
    """Refuse an impossible setting, or a --resume with nothing to resume, in one line
    before any flow starts (inside a flow it would fail with tracebacks)."""
    from dataclasses import fields

    from cnn.checkpoint import CheckpointError
    from cnn.train import TrainConfig, plan
    from cnnpipe.settings import get_settings
    from cnnpipe.store import DatasetStore

    knobs = {f.name for f in fields(TrainConfig)}
    try:
        config = TrainConfig(dataset_dir="", resume=resume, checkpoint_root=str(get_settings().checkpoints_dir),
                             **{key: value for key, value in options.items() if key in knobs})
        store = DatasetStore(dataset)
        if store.exists():
            plan(replace(config, dataset_dir=str(store.local_copy())))
    except (ValueError, CheckpointError) as exc:
        raise click.ClickException(f"{dataset}: {exc}") from None


def _print_training(outcome) -> None:
    if outcome.ingested is not None:
        from cnnpipe.reports import ingest_markdown

        _print_markdown(ingest_markdown(outcome.ingested))
    if outcome.fit is None:
        click.echo(outcome.skipped)
        return
    if outcome.why:
        click.echo(outcome.why)
    result = outcome.fit
    held = result.held_out
    click.echo(f"\nheld-out ({result.held_out_split}, {held['images']:,} images): top-1 {100 * held['top1']:.1f}% "
               f"(error {100 * (1 - held['top1']):.1f}%), top-5 {100 * held['top5']:.1f}%")
    if "ten_crop_top1" in held:
        click.echo(f"ten-patch averaging: top-1 {100 * held['ten_crop_top1']:.1f}%, top-5 {100 * held['ten_crop_top5']:.1f}%")
    click.echo(f"checkpoint: {result.checkpoint}")
    click.echo(f"MLflow run {outcome.run_id}: registered {outcome.model_name}/{outcome.model_version}")
    if outcome.decision is not None:
        verdict = "promoted to champion" if outcome.decision.promoted else "not promoted"
        click.echo(f"gate: {verdict}: {outcome.decision.reason}")
    for warning in outcome.warnings:
        click.echo(f"warning: {warning}", err=True)


@cli.command()
@click.option("--dataset", required=True, help="Dataset to add new images to and train on.")
@click.option("--source", help="Where new images arrive (any `cnnpipe ingest` source); omit to train on the store as is.")
@_training_options
@click.option("--force", is_flag=True,
              help="Train even if the latest registered version was trained on this dataset version.")
def retrain(dataset: str, source: str | None, compile_model: bool, resume: str | None, **options) -> None:
    """Ingest what is new, train, evaluate, register, and promote only a better model.

    This is the flow `cnnpipe serve` runs every night. It trains only when the dataset
    version differs from the one the latest registered version was trained on (champion
    or not), and says why it trains or does not. Training options are those of `train`.

    \b
    Examples:
      cnnpipe retrain --source ./incoming --dataset pets
      cnnpipe retrain --dataset cifar10 --epochs 30 --force
    """
    from flows.retrain import retrain as retrain_flow

    resume = True if resume == "latest" else (resume or False)
    _check_training(dataset, resume, options)
    _before_flows()
    _print_training(retrain_flow(dataset=dataset, source=source, compile=compile_model, resume=resume, **options))


@cli.command()
@click.option("--dataset", required=True, help="Dataset the nightly retraining trains on.")
@click.option("--source", help="Where new training images arrive, ingested before each retraining.")
@click.option("--cron", default="0 2 * * *", show_default=True, help="When to retrain.")
@click.option("--timezone", default="UTC", show_default=True, help="IANA time zone of both schedules.")
@click.option("--inbox", help="Also classify new images arriving here (any `cnnpipe classify` source).")
@click.option("--inbox-cron", default="*/15 * * * *", show_default=True, help="When to classify the inbox.")
@click.option("--model", "model_ref", default=None, help="Registry reference the inbox is classified with "
              f"[default: {REGISTERED_MODEL}@champion].")
@click.option("--epochs", type=int, default=None, help="[default: auto, as for `train`]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def serve(dataset: str, source: str | None, cron: str, timezone: str, inbox: str | None, inbox_cron: str,
          model_ref: str | None, epochs: int | None, device: str) -> None:
    """Run the nightly retraining (and an inbox classifier) on a schedule until stopped.

    Serves Prefect deployments from this process: `retrain/nightly` and, with --inbox,
    `classify/inbox`. With `cnnpipe server` running (or $PREFECT_API_URL) they are
    registered on that server: its UI shows the schedules, and `prefect deployment run`
    works from any shell. Without one they live on an ephemeral API inside this process,
    which no other shell can reach. Stopping the process (Ctrl-C) leaves the schedules
    active for next time.

    \b
    Examples:
      cnnpipe serve --dataset pets --source ./incoming
      cnnpipe serve --dataset pets --cron "30 3 * * *" --timezone Europe/Berlin --inbox ./inbox
    """
    from prefect import serve as prefect_serve
    from prefect.settings import PREFECT_API_URL

    from flows.serve import build_deployments, serving_message

    deployments = build_deployments(dataset, source, cron, timezone, inbox, inbox_cron, model_ref,
                                    {"device": device} | ({"epochs": epochs} if epochs else {}))
    api_url = PREFECT_API_URL.value()
    click.echo(serving_message(deployments, api_url))
    # Prefect's own start message says `prefect deployment run` works: true only on a server.
    prefect_serve(*deployments, pause_on_shutdown=False, print_starting_message=bool(api_url))


@cli.command()
@click.argument("name", required=False)
@click.option("--format", "output_format", type=click.Choice(LISTING_FORMATS), default="table", show_default=True)
def models(name: str | None, output_format: str) -> None:
    """List registered model versions with their figures, aliases and gate decisions.

    \b
    Examples:
      cnnpipe models
      cnnpipe models cnn-classifier
      cnnpipe models --format csv | grep champion
    """
    from cnnpipe.output import write_rows
    from cnnpipe.registry import list_versions

    versions = list_versions(name)
    if not versions:
        click.echo("No registered models yet. `cnnpipe train --dataset NAME` registers one.")
        return
    columns = ["model", "version", "aliases", "created", "dataset", "val top-1", "held-out top-1", "top-5",
               "vs majority", "gate"]
    rows = []
    for v, aliases in versions:
        tags = v.tags
        rows.append((v.name, str(v.version), ", ".join(aliases), _timestamp(v.creation_timestamp),
                     f"{tags.get('dataset', '')} {tags.get('dataset_version_id', '')[:8]}", _percent(tags.get("val_top1")),
                     _percent(tags.get("test_top1") or tags.get("val_top1")),
                     _percent(tags.get("test_top5") or tags.get("val_top5")), _versus_majority(tags),
                     _gate_column(tags, aliases)))
    write_rows(columns, rows, output_format)
    if output_format != "table":
        return
    gated = [(v, v.tags["gate.reason"]) for v, _ in versions if v.tags.get("gate.reason")]
    if gated:
        click.echo("\nGate decisions:")
        for v, reason in gated:
            click.echo(f"  {v.name}/{v.version} {v.tags.get('gate.decision', '')}: {reason}")


def _gate_column(tags: dict, aliases: list[str]) -> str:
    decision = tags.get("gate.decision", "")
    if "champion" in aliases and decision != "promoted":
        return f"{decision}, made champion by hand" if decision else "made champion by hand"
    return decision


def _versus_majority(tags: dict[str, str]) -> str:
    """`25.00% of 400, p=0.26`: the validation split's majority-class rate, its size, the binomial p-value."""
    rate, images, p_value = tags.get("gate.majority_rate"), tags.get("gate.val_images"), tags.get("gate.p_value")
    if not rate or not images:
        return ""  # gated before the majority-class test, or never gated
    try:
        rate_value, p = float(rate), float(p_value)
    except (TypeError, ValueError):
        return f"{rate} of {images}"
    if images == "0" or rate_value != rate_value or p != p:  # NaN: the split could not be measured
        return "not measured"
    return f"{100 * rate_value:.2f}% of {images}, p={p:.2g}"


def _percent(value: str | None) -> str:
    return f"{100 * float(value):.2f}%" if value else ""


def _timestamp(millis: int) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(millis / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M")


@cli.command()
@click.argument("name")
@click.argument("version")
def promote(name: str, version: str) -> None:
    """Make VERSION of NAME the champion by hand (recorded with reason `manual`).

    \b
    Example:
      cnnpipe promote cnn-classifier 3
    """
    from cnnpipe.registry import promote as promote_version

    decision = promote_version(name, version)
    click.echo(f"{name}: champion is now version {decision.challenger} (was {decision.champion or 'none'})")


@cli.command()
@click.argument("name")
def rollback(name: str) -> None:
    """Move NAME's champion back to the version that held it before.

    \b
    Example:
      cnnpipe rollback cnn-classifier
    """
    from cnnpipe.registry import rollback as rollback_champion

    decision = rollback_champion(name)
    click.echo(f"{name}: champion rolled back from version {decision.champion} to {decision.challenger}")


@cli.command()
@click.argument("source")
@click.option("--model", "model_ref", default=f"{REGISTERED_MODEL}@champion", show_default=True,
              help="Registered model: NAME@ALIAS or NAME/VERSION (models:/ optional).")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="Use a checkpoint file from `cnnpipe train` instead of the registry.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--batch-size", default=256, show_default=True)
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
    from cnnpipe.classify import open_classify_source
    from cnnpipe.registry import parse_model_ref
    from cnnpipe.reports import classify_markdown
    from flows.classify import classify as classify_flow

    if not checkpoint:
        parse_model_ref(model_ref)  # a malformed reference fails here, in one line
    open_classify_source(source)
    _before_flows()
    summary = classify_flow(source=source, model=model_ref, checkpoint=checkpoint, device=device, batch_size=batch_size,
                            ray_address=ray_address, shards=shards)
    _print_markdown(classify_markdown(summary))


@cli.command()
@click.argument("query")
@click.option("--format", "output_format", type=click.Choice(["table", "csv", "json", "parquet"]), default="table",
              show_default=True)
@click.option("--output", type=click.Path(dir_okay=False, writable=True), help="Write here instead of the terminal.")
@click.option("--max-rows", default=1000, show_default=True, help="Row cap for table output.")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds before the query is stopped (its process is killed).")
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
    if output:
        click.echo(f"{len(result.rows):,} row{'s' if len(result.rows) != 1 else ''} written to {output} "
                   f"({output_format})")


@cli.group(invoke_without_command=True)
@click.option("--format", "output_format", type=click.Choice(LISTING_FORMATS), default="table", show_default=True)
@click.pass_context
def datasets(ctx: click.Context, output_format: str) -> None:
    """List datasets with their versions and counts; `datasets show NAME` for details,
    `datasets verify NAME` to check every image."""
    if ctx.invoked_subcommand is not None:
        return
    from cnnpipe.output import write_rows
    from cnnpipe.settings import get_settings
    from cnnpipe.store import list_datasets

    manifests = list_datasets()
    if not manifests:
        click.echo(f"No datasets under {get_settings().datasets_url} yet. Try: cnnpipe ingest SOURCE --dataset NAME")
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
    from cnnpipe.reports import dataset_markdown

    store = _stored_dataset(name)
    damaged = store.verify()
    _print_markdown(dataset_markdown(store, damaged))
    _fail_if_damaged(name, damaged)


@datasets.command("verify")
@click.argument("name")
def datasets_verify(name: str) -> None:
    """Read every Parquet part of a dataset: its footer, and each row's image against its SHA-256.

    Reads the whole dataset. Exits 1 if a part is damaged, after saying how to repair it."""
    from cnnpipe.reports import verification_markdown

    store = _stored_dataset(name)
    damaged = store.verify(read_rows=True)
    _print_markdown(verification_markdown(store, damaged))
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


@cli.group()
def server() -> None:
    """The Prefect and MLflow UIs over this pipeline's state, in the background on 127.0.0.1.

    While it runs, every flow command in any shell runs on it instead of starting
    Prefect's ephemeral API, unless $PREFECT_API_URL names another server. Its Prefect
    database lives under $CNNPIPE_HOME/prefect; the MLflow UI reads the store the
    commands write to ($MLFLOW_TRACKING_URI).

    \b
    Examples:
      cnnpipe server start                  # Prefect UI on :4200, MLflow UI on :5000
      cnnpipe server start --port 4300 --mlflow-port 5300
      cnnpipe server status
      cnnpipe server stop
    """


@server.command("start")
@click.option("--port", default=4200, show_default=True, help="Port of the Prefect server and its UI.")
@click.option("--mlflow-port", default=5000, show_default=True, help="Port of the MLflow UI.")
def server_start(port: int, mlflow_port: int) -> None:
    """Start both servers (whichever is not running) and print their URLs."""
    from cnnpipe.local_server import start

    click.echo("\n".join(start(port, mlflow_port)))


@server.command("stop")
def server_stop() -> None:
    """Stop both servers."""
    from cnnpipe.local_server import stop

    click.echo("\n".join(stop()))


@server.command("status")
def server_status() -> None:
    """Say what runs where: both UIs, and the Prefect API flow commands use."""
    from cnnpipe.local_server import status

    click.echo("\n".join(status()))


@cli.command()
def demo() -> None:
    """Make a small image set and run the pipeline over it.

    Writes rendered shapes (JPEG and PNG in class folders, two deliberately broken
    files, and a tar archive of more images) under $CNNPIPE_HOME/demo, ingests the
    folder into the dataset `shapes`, then runs the nightly retraining flow once: it
    ingests the archive, trains alexnet-cifar on the CPU with the automatic recipe (no
    training flags: 30 epochs of batch 32, about a minute on a 2-core CPU with AMX),
    logs the run to MLflow and registers `shapes-classifier`, promoting it to champion
    if it beats the last one and the majority class. It then classifies the archive into DuckDB
    with the champion and ends with a SQL query and where to look next.
    """
    from cnnpipe.demo import write_demo_images
    from cnnpipe.output import write_result
    from cnnpipe.reports import classify_markdown, ingest_markdown
    from cnnpipe.settings import get_settings
    from cnnpipe.sql import run_query
    from cnnpipe.store import DatasetStore
    from flows.classify import classify as classify_flow
    from flows.ingest import ingest as ingest_flow
    from flows.retrain import retrain as retrain_flow

    _before_flows()
    settings = get_settings()
    folder, archive = write_demo_images(settings.demo_dir)
    _print_markdown(ingest_markdown(ingest_flow(source=str(folder), dataset="shapes")))
    # No training flags: the automatic recipe chooses for the demo's 640 training images.
    outcome = retrain_flow(dataset="shapes", source=str(archive), registered_model=DEMO_MODEL)
    _print_training(outcome)
    summary = classify_flow(source=str(archive), model=f"{DEMO_MODEL}@champion")
    _print_markdown(classify_markdown(summary))
    query = ("SELECT label, count(*) AS images, round(avg(confidence), 3) AS mean_confidence "
             "FROM latest_predictions GROUP BY label ORDER BY label")
    click.echo(f'\n$ cnnpipe sql "{query}"')
    write_result(run_query(query, settings.predictions_db), "table", None)
    files = f"{DatasetStore('shapes').root}/**/*.parquet"
    click.echo(f"""
Where to look next:
  cnnpipe models {DEMO_MODEL}        versions, figures, aliases and gate decisions
  cnnpipe datasets show shapes
The dataset is plain Parquet; DuckDB reads it with no cnnpipe involved:
  SELECT split, label, count(*) FROM '{files}' GROUP BY ALL ORDER BY ALL;""")
    click.echo(f"\nSee it all in the UIs:\n{_demo_uis()}")


def _demo_uis() -> str:
    from cnnpipe.local_server import ui_urls

    urls = ui_urls()
    if urls is None:
        return ("  cnnpipe server start    then its Prefect UI shows these flow runs and their training report,\n"
                "                          and its MLflow UI the runs, curves, plots, model and champion")
    prefect_ui, mlflow_ui = urls
    lines = [f"  {prefect_ui}   Prefect UI: these flow runs, their logs and the training report"]
    if mlflow_ui:
        lines.append(f"  {mlflow_ui}   MLflow UI: params, curves, plots, the model and its champion alias")
    return "\n".join(lines)


def main() -> None:
    # The pipeline makes no outbound calls of its own; Prefect's usage telemetry stays off
    # unless the user turns it on.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Our own progress and warnings go to the same console and run logs as Prefect's.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "cnnpipe")
    # Our own progress bars say what is happening; MLflow's per-download bars only add noise.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # The first run on a busy 2-core machine migrates Prefect's database for longer than the
    # ephemeral server's default 20 s start-up allowance.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # A running `cnnpipe server` spares each flow command the ephemeral API's start-up; Prefect
    # reads PREFECT_API_URL once, when imported, so this comes first.
    from cnnpipe.local_server import use_local_server

    use_local_server()
    _ensure_prefect_home()
    cli(prog_name="cnnpipe")


def _ensure_prefect_home() -> None:
    # Prefect does not create a missing PREFECT_HOME: every command then timed out after 25 s.
    home = os.environ.get("PREFECT_HOME")
    if not home:
        return
    try:
        Path(home).expanduser().mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SystemExit(f"Error: PREFECT_HOME={home} cannot be created: {exc.strerror or exc}")


if __name__ == "__main__":
    sys.exit(main())
