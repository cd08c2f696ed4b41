"""Commands over the model registry: `models` lists versions and gate decisions, `promote` and `rollback`."""

from __future__ import annotations

from pathlib import Path

import click

from cnnpipe.cli.common import LISTING_FORMATS


@click.command()
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
    from cnnpipe.models.registry import list_versions
    from cnnpipe.reports.output import write_rows

    versions = list_versions(name)
    if not versions:
        # A script reading --format json or csv still gets a valid, empty document on stdout.
        click.echo("No registered models yet. `cnnpipe train --dataset NAME` registers one.",
                   err=output_format != "table")
        if output_format == "table":
            return
    columns = ["model", "version", "aliases", "created", "dataset", "started from", "val top-1", "held-out top-1",
               "top-5", "leaked", "vs majority", "gate"]
    rows = []
    for v, aliases in versions:
        tags = v.tags
        rows.append((v.name, str(v.version), ", ".join(aliases), _timestamp(v.creation_timestamp),
                     f"{tags.get('dataset', '')} {tags.get('dataset_version_id', '')[:8]}", _started_from(v),
                     _percent(tags.get("val_top1")),
                     _percent(tags.get("test_top1") or tags.get("val_top1")),
                     _percent(tags.get("test_top5") or tags.get("val_top5")), _leaked(tags), _versus_majority(tags),
                     _gate_column(tags, aliases)))
    write_rows(columns, rows, output_format)
    if output_format != "table":
        return
    gated = [(v, v.tags["gate.reason"]) for v, _ in versions if v.tags.get("gate.reason")]
    if gated:
        click.echo("\nGate decisions:")
        for v, reason in gated:
            click.echo(f"  {v.name}/{v.version} {v.tags.get('gate.decision', '')}: {reason}")


def _leaked(tags: dict) -> str:
    """Held-out images with a twin in train, and the held-out top-1 without them; empty before the leak check."""
    for split in ("test", "val"):
        if f"leaked_{split}_images" in tags:
            leaked = int(float(tags[f"leaked_{split}_images"]))
            without = tags.get(f"{split}_top1_without_leaks")
            return f"{leaked} ({_percent(without)} without)" if leaked and without else str(leaked)
    return ""


def _started_from(version) -> str:
    """scratch, vN of the same model, NAME/VERSION of another, a file's name or torchvision; empty
    for a version registered before warm starts."""
    started = version.tags.get("init_model_version") or version.tags.get("init", "")
    if started.startswith(f"{version.name}/"):
        return "v" + started.rpartition("/")[2]
    return started if version.tags.get("init_model_version") else Path(started).name


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


@click.command()
@click.argument("name")
@click.argument("version")
def promote(name: str, version: str) -> None:
    """Make VERSION of NAME the champion by hand (recorded with reason `manual`).

    \b
    Example:
      cnnpipe promote cnn-classifier 3
    """
    from cnnpipe.predictions.champions import promote as promote_version

    decision = promote_version(name, version)
    click.echo(f"{name}: champion is now version {decision.challenger} (was {decision.champion or 'none'})")


@click.command()
@click.argument("name")
def rollback(name: str) -> None:
    """Move NAME's champion back to the version that held it before.

    \b
    Example:
      cnnpipe rollback cnn-classifier
    """
    from cnnpipe.predictions.champions import rollback as rollback_champion

    decision = rollback_champion(name)
    click.echo(f"{name}: champion rolled back from version {decision.champion} to {decision.challenger}")


COMMANDS = (models, promote, rollback)
