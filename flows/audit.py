from __future__ import annotations

from cnnpipe.models.params import TrainingParams
from cnnpipe.monitoring.audit import AuditFindings
from flows.engine import flow
from tasks.audit import audit, record_audit, report_audit


@flow(name="audit")
def audit_dataset(dataset: str, folds: int = 2, params: TrainingParams = TrainingParams()) -> AuditFindings:
    """Audit a dataset of the store: twins within and across its splits (a held-out image whose twin
    is in train is a leak), labels that confident learning doubts and outliers, from `folds` trainings
    on the other folds with `params`. With 0 folds, only the twin check, in seconds. Writes the
    `near_duplicates`, `label_issues` and `outliers` tables and a report.

    Args:
        dataset: Dataset in the store to audit.
        folds: Trainings for out-of-sample probabilities (0: twins only, on hashes alone).
        params: How each fold trains; the training options of `cnnpipe audit`.
    """
    findings = audit(dataset, folds, params)
    record_audit(findings)
    report_audit(findings)
    return findings
