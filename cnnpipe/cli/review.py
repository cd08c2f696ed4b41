"""`review export`: the predictions a person should check, as files and a manifest to correct and ingest."""

from __future__ import annotations

from pathlib import Path

import click

from cnnpipe.cli.common import collect_garbage
from cnnpipe.settings import REGISTERED_MODEL


@click.group()
def review() -> None:
    """Close the loop: export predictions for a person to check, then ingest the corrections."""


@review.command("export")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--model", "model_ref", default=f"{REGISTERED_MODEL}@champion", show_default=True,
              help="NAME@champion or NAME/VERSION: whose predictions to review.")
@click.option("--low-confidence", "mode", flag_value="low-confidence", default=True,
              help="Predictions under 0.5 calibrated confidence, least confident first [default].")
@click.option("--disagreements", "mode", flag_value="disagreements",
              help="Images another version of the model labels otherwise, least confident first.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True, help="At most this many images.")
def export(out_dir: Path, model_ref: str, mode: str, limit: int) -> None:
    """Write images worth a look into OUT_DIR, with labels.csv to correct.

    Only images with no label yet are chosen. Each is re-read from the source it was
    classified from, or from the dataset store when that source is gone; OUT_DIR/unavailable.csv
    lists those that neither has, with the reason. labels.csv is a manifest that `cnnpipe
    ingest` reads: its label column holds the prediction, so a correction is one edited cell.
    Ingest it into the dataset that retrains, and production_accuracy counts the labels.

    \b
    Examples:
      cnnpipe review export review/
      cnnpipe review export review/ --disagreements --limit 50
      # edit review/labels.csv, then:
      cnnpipe ingest review/labels.csv --dataset cifar10
    """
    from cnnpipe.monitoring.review import check_export_folder, choose, export_for_review
    from cnnpipe.settings import get_settings

    collect_garbage()  # reading back many images is long work
    settings = get_settings()
    check_export_folder(out_dir, settings)  # before choosing, which can take long, and which export repeats
    rows = choose(settings.predictions_db, model_ref, mode, limit)
    if not rows:
        chosen = ("low-confidence predictions (calibrated confidence under 0.5)" if mode == "low-confidence"
                  else "predictions that another version labels otherwise")
        click.echo(f"Nothing to review: {model_ref} has no {chosen} of images without a label.")
        return
    done = export_for_review(rows, out_dir, settings)
    click.echo(f"Wrote {done.from_source + done.from_store} image(s) to {out_dir / 'images'} "
               f"({done.from_source} from their sources, {done.from_store} from the dataset store) "
               f"and {out_dir / 'labels.csv'}.")
    if done.unavailable:
        click.echo(f"{len(done.unavailable)} image(s) could not be read back; see {out_dir / 'unavailable.csv'}, "
                   f"e.g. {done.unavailable[0]['member_path']}: {done.unavailable[0]['reason']}")
    click.echo(f"Correct the label column, then: cnnpipe ingest {out_dir / 'labels.csv'} --dataset NAME")


COMMANDS = (review,)
