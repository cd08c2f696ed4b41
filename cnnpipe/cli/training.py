"""Commands that train: `train` once, `retrain` as the nightly flow does, `serve` that flow on a schedule."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import click

from cnnpipe.cli.common import before_flows, collect_garbage, print_markdown
from cnnpipe.cli.knobs import TrainingCommand, training_params

if TYPE_CHECKING:
    from cnnpipe.models.params import TrainingParams
    from cnnpipe.reports.outcomes import TrainingOutcome


@click.command(cls=TrainingCommand, without=("scratch_every",))
@click.option("--dataset", required=True, help="Dataset in the store to train on.")
def train(dataset: str, **knobs: Any) -> None:
    """Train a CNN on a dataset of the store, log it to MLflow and register it.

    Prints the recipe first, the validation top-1 each epoch and, at the end, the
    held-out top-1 and top-5 (the test split when the dataset has one, else
    validation). The new version becomes `challenger`, and `champion` only if its
    validation top-1 clearly beats the champion's and the majority class. SGD with
    momentum 0.9 and a one-cycle learning rate; batch size, learning rate, epochs and
    regularisation are chosen for the size of the train split unless given (at
    50,000 images: batch 512, lr 0.2, 30 epochs, dropout 0.5, as for CIFAR-10), and
    the input size for its images: 32 px for images of about 32 px, for photos the
    largest size whose training fits about 10 minutes on this device (about 128 px on
    a 2-core CPU, 224 on a GPU). The recipe line says what it chose and why.

    The weights start random, or with --init from a trained model: a registered version,
    a checkpoint, or torchvision's ImageNet weights. Classes are matched by name, and
    the recipe then fine-tunes: a quarter of the epochs, at a tenth of the peak lr (half
    of it when the weights know under half of the classes).

    \b
    Examples:
      cnnpipe train --dataset pets                      # the automatic recipe
      cnnpipe train --dataset pets --image-size 96 --resize crop
      cnnpipe train --dataset cifar10 --epochs 30 --batch-size 256 --lr 0.1
      cnnpipe train --dataset cifar10 --model alexnet-cifar --norm lrn --schedule plateau
      cnnpipe train --dataset cifar10 --pool avg --padding replicate --momentum 0.8
      cnnpipe train --dataset imagenet --model alexnet --device cuda --ten-crop
      cnnpipe train --dataset pets --init champion      # fine-tune the champion
      cnnpipe train --dataset digits --init cifar-classifier/2
      cnnpipe train --dataset pets --model resnet18 --init torchvision
      cnnpipe train --dataset cifar10 --resume          # after a crash or kill -9
      cnnpipe train --dataset imagenet --model alexnet --nproc 8   # DDP on 8 GPUs
    """
    from flows.train import train as train_flow

    params = training_params(knobs)
    _check_training(dataset, params)
    before_flows()
    print_training(train_flow(dataset=dataset, params=params))


@click.command(cls=TrainingCommand)
@click.option("--dataset", required=True, help="Dataset to add new images to and train on.")
@click.option("--source", help="Where new images arrive (any `cnnpipe ingest` source); omit to train on the store as is.")
@click.option("--force", is_flag=True,
              help="Train even if the latest registered version was trained on this dataset version.")
def retrain(dataset: str, source: str | None, force: bool, **knobs: Any) -> None:
    """Ingest what is new, train, evaluate, register, and promote only a better model.

    This is the flow `cnnpipe serve` runs every night. It trains only when the dataset
    version differs from the one the latest registered version was trained on (champion
    or not), and says why it trains or does not. Training options are those of `train`.

    Without --init it fine-tunes the champion when the champion has the same model and
    input size and was trained on this dataset, and says why not otherwise. Every
    --scratch-every'th version (7) trains from scratch, and so does a night whose warm
    start does not beat the champion. --init scratch turns warm starts off.

    \b
    Examples:
      cnnpipe retrain --source ./incoming --dataset pets
      cnnpipe retrain --dataset pets --init scratch     # no warm start
      cnnpipe retrain --dataset cifar10 --epochs 30 --force
    """
    from flows.retrain import retrain as retrain_flow

    params = training_params(knobs)
    if source is None:  # new images may make a small dataset trainable: the flow checks it after ingesting
        _check_training(dataset, params)
    before_flows()
    print_training(retrain_flow(dataset=dataset, source=source, force=force, params=params))


def _check_training(dataset: str, params: TrainingParams) -> None:
    """Refuse an impossible setting, or a --resume with nothing to resume or with a flag that
    would change the run it resumes, in one line before any flow starts (inside a flow it
    would fail with tracebacks, the last after a wasted epoch)."""
    from cnn.checkpoint import CheckpointError
    from cnn.train import plan
    from cnnpipe.settings import get_settings
    from cnnpipe.store import DatasetStore

    from cnnpipe.errors import CnnpipeError
    from cnnpipe.models.warm_start import local_init

    try:
        # A registered version is fetched and checked in the flow: the registry takes seconds to reach.
        config = params.config(dataset_dir="", checkpoint_root=str(get_settings().checkpoints_dir),
                               init=local_init(params.init or "scratch") or "scratch")
        store = DatasetStore(dataset)
        if store.exists():
            plan(replace(config, dataset_dir=str(store.local_copy())))
    except (ValueError, CheckpointError, CnnpipeError) as exc:
        raise click.ClickException(f"{dataset}: {exc}") from None


def print_training(outcome: TrainingOutcome) -> None:
    """What a training command ends with: what it ingested, held-out figures, the registered version, the gate."""
    if outcome.ingested is not None:
        from cnnpipe.reports.markdown import ingest_markdown

        print_markdown(ingest_markdown(outcome.ingested))
    if outcome.fit is None:
        click.echo(outcome.skipped)
        return
    if outcome.why:
        click.echo(outcome.why)
    if outcome.started_from:
        click.echo(outcome.started_from)
    result = outcome.fit
    held = result.held_out
    click.echo(f"\nheld-out ({result.held_out_split}, {held['images']:,} images): top-1 {100 * held['top1']:.1f}% "
               f"(error {100 * (1 - held['top1']):.1f}%), top-5 {100 * held['top5']:.1f}%")
    if outcome.leaks:
        click.echo(outcome.leaks)
    if "ten_crop_top1" in held:
        click.echo(f"ten-patch averaging: top-1 {100 * held['ten_crop_top1']:.1f}%, top-5 {100 * held['ten_crop_top5']:.1f}%")
    click.echo(f"checkpoint: {result.checkpoint}")
    click.echo(f"MLflow run {outcome.run_id}: registered {outcome.model_name}/{outcome.model_version}")
    if outcome.decision is not None:
        verdict = "promoted to champion" if outcome.decision.promoted else "not promoted"
        click.echo(f"gate: {verdict}: {outcome.decision.reason}")
    for warning in outcome.warnings:
        click.echo(f"warning: {warning}", err=True)


# A schedule resumes nothing: `--resume` would fail every night after the first. `--model` names
# the model the inbox is classified with, so the model to train is `--train-model` here.
@click.command(cls=TrainingCommand, without=("resume",), flags={"model": "--train-model"})
@click.option("--dataset", required=True, help="Dataset the nightly retraining trains on.")
@click.option("--source", help="Where new training images arrive, ingested before each retraining.")
@click.option("--cron", default="0 2 * * *", show_default=True, help="When to retrain.")
@click.option("--timezone", default="UTC", show_default=True, help="IANA time zone of both schedules.")
@click.option("--inbox", help="Also classify new images arriving here (any `cnnpipe classify` source).")
@click.option("--inbox-cron", default="*/15 * * * *", show_default=True, help="When to classify the inbox.")
@click.option("--model", "model_ref", default=None, help="Registry reference the inbox is classified with "
              "[default: the champion of --registered-model].")
def serve(dataset: str, source: str | None, cron: str, timezone: str, inbox: str | None, inbox_cron: str,
          model_ref: str | None, **knobs: Any) -> None:
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

    collect_garbage()  # it serves until stopped
    params = training_params(knobs)
    deployments = build_deployments(dataset, source, cron, timezone, inbox, inbox_cron,
                                    model_ref or f"{params.registered_model}@champion", params)
    api_url = PREFECT_API_URL.value()
    click.echo(serving_message(deployments, api_url))
    # Prefect's own start message says `prefect deployment run` works: true only on a server.
    prefect_serve(*deployments, pause_on_shutdown=False, print_starting_message=bool(api_url))


COMMANDS = (train, retrain, serve)
