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
@click.option("--outliers", "mode", flag_value="outliers",
              help="Images farthest from what the model was trained on (its reference embeddings), farthest first.")
@click.option("--label-issues", "dataset", metavar="DATASET", default=None,
              help="Instead of predictions: the images of DATASET whose label `cnnpipe audit` doubts, in its "
                   "rank order, the suggested label filled in.")
@click.option("--run", "classify_run", metavar="CLASSIFY_RUN_ID", default=None,
              help="Only the predictions of this classify run; alone, all of them, least typical first.")
@click.option("--alerting", is_flag=True,
              help="Only the predictions of the classify runs whose drift alert is on (`cnnpipe monitor`); "
                   "alone, all of them, least typical first.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True, help="At most this many images.")
@click.pass_context
def export(ctx: click.Context, out_dir: Path, model_ref: str, mode: str, dataset: str | None,
           classify_run: str | None, alerting: bool, limit: int) -> None:
    """Write images worth a look into OUT_DIR, with labels.csv to correct.

    Only images with no label yet are chosen. Each is re-read from the source it was
    classified from, or from the dataset store when that source is gone; OUT_DIR/unavailable.csv
    lists those that neither has, with the reason. labels.csv is a manifest that `cnnpipe
    ingest` reads: its label column holds the prediction, so a correction is one edited cell.
    Ingest it into the dataset that retrains, and production_accuracy counts the labels.

    --outliers ranks images by the distance of their embedding from the mean of the images the
    version was evaluated on when trained, in their standard deviations (labels.csv adds it as
    `distance`). --label-issues exports a dataset's images rather than predictions, read from the
    store, with their split, given label and label quality.

    --run and --alerting review whole classify runs, of whatever model ran them: without a mode,
    every image, farthest from the reference embeddings first, then least confident. A batch of
    inverted or dark images that the model labels with confidence 1.0 has no low-confidence
    prediction, and still shows its odd images first this way.

    \b
    Examples:
      cnnpipe review export review/
      cnnpipe review export review/ --disagreements --limit 50
      cnnpipe review export odd/ --outliers --run classify-20261201T020000
      cnnpipe review export drifted/ --alerting --limit 50
      cnnpipe review export relabel/ --label-issues cifar10
      # edit review/labels.csv, then:
      cnnpipe ingest review/labels.csv --dataset cifar10
    """
    from cnnpipe.monitoring.review import (LABEL_ISSUE_COLUMNS, OUTLIER_COLUMNS, alerting_runs, check_export_folder,
                                           choose, choose_label_issues, export_for_review)
    from cnnpipe.settings import get_settings

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT

    if dataset is not None:
        flags = {"mode": f"--{mode}", "model_ref": "--model", "classify_run": "--run", "alerting": "--alerting"}
        named = [flag for name, flag in flags.items() if given(name)]
        if named:
            raise click.UsageError(f"--label-issues exports a dataset's images, not predictions: "
                                   f"drop {' and '.join(named)}")
    collect_garbage()  # reading back many images is long work
    settings = get_settings()
    check_export_folder(out_dir, settings)  # before choosing, which can take long, and which export repeats
    if dataset is not None:
        rows, extra = choose_label_issues(settings.predictions_db, dataset, limit, settings), LABEL_ISSUE_COLUMNS
        nothing = (f"Nothing to review: no label issues of dataset {dataset} are recorded (run `cnnpipe audit "
                   f"{dataset}`), or each has been corrected since.")
    elif classify_run or alerting:
        model = model_ref if given("model_ref") else None  # a run's own model, unless one is named
        runs = ([classify_run] if classify_run else []) + (
            alerting_runs(settings.predictions_db, model) if alerting else [])
        mode = mode if given("mode") else "least-typical"
        rows = choose(settings.predictions_db, model, mode, limit, runs) if runs else []
        extra = OUTLIER_COLUMNS if mode in ("outliers", "least-typical") else ()
        shown = ", ".join(runs[:3]) + (f" and {len(runs) - 3} more" if len(runs) > 3 else "")
        nothing = (f"Nothing to review: classify run(s) {shown} hold no {mode} prediction of an image without a "
                   "label." if runs else "Nothing to review: no classify run has its drift alert on (`cnnpipe monitor`).")
    else:
        rows = choose(settings.predictions_db, model_ref, mode, limit)
        extra = OUTLIER_COLUMNS if mode == "outliers" else ()
        chosen = {"low-confidence": "low-confidence predictions (calibrated confidence under 0.5)",
                  "disagreements": "predictions that another version labels otherwise",
                  "outliers": "predictions with embeddings"}[mode]
        nothing = f"Nothing to review: {model_ref} has no {chosen} of images without a label."
    if not rows:
        click.echo(nothing)
        return
    done = export_for_review(rows, out_dir, settings, extra)
    click.echo(f"Wrote {done.from_source + done.from_store} image(s) to {out_dir / 'images'} "
               f"({done.from_source} from their sources, {done.from_store} from the dataset store) "
               f"and {out_dir / 'labels.csv'}.")
    if done.unavailable:
        click.echo(f"{len(done.unavailable)} image(s) could not be read back; see {out_dir / 'unavailable.csv'}, "
                   f"e.g. {done.unavailable[0]['member_path'] or done.unavailable[0]['sha256']}: "
                   f"{done.unavailable[0]['reason']}")
    click.echo(f"Correct the label column, then: cnnpipe ingest {out_dir / 'labels.csv'} " +
               (f"--dataset {dataset} --relabel" if dataset is not None else "--dataset NAME"))


COMMANDS = (review,)
