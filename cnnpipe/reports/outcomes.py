"""What a training flow returns, `TrainingOutcome`: typed for the reports and the CLI, without importing prefect.

Its parts' types are named for type checkers only, so importing this module costs nothing:
no torch, prefect or mlflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cnn.recipe import Recipe
    from cnn.train import FitResult
    from cnnpipe.predictions.champions import GateDecision
    from cnnpipe.store import IngestSummary


@dataclass
class TrainingOutcome:
    """What a training flow leaves behind: metrics, the MLflow run, the registered version, the decision."""

    fit: FitResult | None = None
    run_id: str = ""
    run_url: str = ""
    model_name: str = ""
    model_version: str = ""
    decision: GateDecision | None = None
    skipped: str = ""
    # What the nightly run ingested first, and why it trained or did not.
    ingested: IngestSummary | None = None
    why: str = ""
    recipe: Recipe | None = None
    # Why the run may not have learnt, said before or during training.
    warnings: list[str] = field(default_factory=list)
    # "init from shapes-classifier v3: 4 classes kept, 1 new, 0 dropped"; empty from scratch.
    started_from: str = ""
    # "leak check: 3 of the 200 test images have a twin in train; ..." (`cnnpipe.monitoring.audit.leak_check`).
    leaks: str = ""
    details: dict = field(default_factory=dict)
