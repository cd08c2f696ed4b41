"""`cnnpipe audit`: leaks, twins, likely wrong labels and outliers of a dataset."""

from __future__ import annotations

from typing import Any

import click

from cnnpipe.cli.common import before_flows
from cnnpipe.cli.knobs import TrainingCommand, training_params

# What a fold's training does not take: it registers nothing, resumes nothing, and starts from
# scratch, since weights that saw the held-out fold would not give out-of-sample probabilities.
_NOT_FOR_FOLDS = ("resume", "registered_model", "min_improvement", "nproc", "init", "scratch_every", "ten_crop")


@click.command(cls=TrainingCommand, without=_NOT_FOR_FOLDS)
@click.argument("dataset")
@click.option("--folds", default=2, show_default=True, type=click.IntRange(min=0),
              help="Trainings for out-of-sample probabilities, each on the other folds of the train split; "
                   "0: only the twin check, on hashes alone, in seconds.")
def audit(dataset: str, folds: int, **knobs: Any) -> None:
    """Find leaks, twins, likely wrong labels and outliers in DATASET.

    Twins are images that are one picture after re-encoding, resizing, a small crop or a
    colour shift: their perceptual hashes (kept at ingest) lie within a few bits and one
    model's embeddings agree. A val or test image whose twin is in train is a leak, which
    flatters every figure measured on it. Likely wrong labels come from confident learning
    (cleanlab) on out-of-sample probabilities: each train image is predicted by a model
    trained, with the automatic recipe, on the other folds; val and test images by all of
    them. Outliers are the 1% of images farthest from their neighbours.

    Writes the near_duplicates, label_issues and outliers tables (query them with `cnnpipe
    sql`), a report with the leak pairs side by side, and an MLflow run. The training
    options below apply to each fold: --epochs 5 keeps a first audit quick.

    \b
    Examples:
      cnnpipe audit pets                     # 2 folds, the automatic recipe
      cnnpipe audit pets --folds 0           # leaks and twins only, in seconds
      cnnpipe audit cifar10 --folds 3 --epochs 10
      cnnpipe review export ./check --label-issues pets
      cnnpipe sql "SELECT * FROM near_duplicates WHERE split <> twin_split"
    """
    from flows.audit import audit_dataset
    from cnnpipe.cli.common import print_markdown
    from cnnpipe.reports.markdown import audit_markdown

    from cnnpipe.settings import get_settings

    params = training_params(knobs)
    before_flows()
    findings = audit_dataset(dataset=dataset, folds=folds, params=params)
    print_markdown(audit_markdown(findings))  # the thumbnails are in the report, not the terminal
    click.echo(f"report: {get_settings().reports_dir / 'audit' / dataset / 'audit.md'}")


COMMANDS = (audit,)
