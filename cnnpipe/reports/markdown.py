"""Run summaries as Markdown: the CLI renders them with rich, Prefect keeps them as artifacts."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import TYPE_CHECKING

# Named for type checkers only: the audit's module imports torch, which an ingest never needs.
if TYPE_CHECKING:
    from cnnpipe.monitoring.audit import AuditFindings
    from cnnpipe.reports.outcomes import TrainingOutcome
    from cnnpipe.store import DamagedPart, DatasetStore, IngestSummary

MAX_CLASS_ROWS = 20
MAX_REJECT_LINES = 10
SPLITS = ("train", "val", "test")


def ingest_markdown(summary: IngestSummary) -> str:
    rate = (summary.added + summary.duplicates) / summary.seconds if summary.seconds else 0.0
    lines = [
        f"### Ingest into `{summary.dataset}`",
        f"Source `{summary.source_uri}`",
        "",
        f"**{summary.added:,} added**, {summary.duplicates:,} duplicates skipped, "
        f"{len(summary.rejected):,} rejected, in {summary.seconds:.1f} s ({rate:,.0f} images/s). "
        f"Dataset is at version {summary.version} (`{summary.version_id or '-'}`) with {summary.total_rows:,} images.",
        "",
    ]
    if summary.hidden_skipped:
        lines += [f"{summary.hidden_skipped:,} hidden files (dot-files, `__MACOSX/`) skipped by rule.", ""]
    if summary.val_from_train:
        lines += [f"No `val/` folder in the source: {summary.val_from_train:.0%} of its `train/` images "
                  "(by hash) are the validation split (`--val-fraction`).", ""]
    # A relabel adds no image: its counts move between classes, shown signed.
    lines += counts_table(summary.counts, summary.added_counts, signed=bool(summary.relabelled))
    if summary.rejected:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in summary.rejected_by_reason.items())
        lines += ["", f"**Rejected** ({reasons})", ""]
        lines += [f"- `{r.path}`: {r.reason} ({r.detail})" for r in summary.rejected[:MAX_REJECT_LINES]]
        if len(summary.rejected) > MAX_REJECT_LINES:
            lines.append(f"- … and {len(summary.rejected) - MAX_REJECT_LINES:,} more in the dataset's rejected.json")
    return "\n".join(lines) + "\n"


def counts_table(counts: dict[str, dict[str, int]], added: dict[str, dict[str, int]] | None = None,
                 signed: bool = False) -> list[str]:
    classes = sorted({label for labels in counts.values() for label in labels})
    if not classes:
        return []
    splits = [s for s in SPLITS if s in counts] + sorted(set(counts) - set(SPLITS))
    header = ["class", *splits, "total"] + ([("relabelled now" if signed else "added now")] if added is not None else [])
    number = "{:+,}" if signed else "{:,}"
    rows = [f"| {' | '.join(header)} |", f"|{'|'.join(['---'] + ['---:'] * (len(header) - 1))}|"]
    for label in classes[:MAX_CLASS_ROWS]:
        per_split = [counts.get(split, {}).get(label, 0) for split in splits]
        cells = [label, *(f"{n:,}" for n in per_split), f"{sum(per_split):,}"]
        if added is not None:
            cells.append(number.format(sum(labels.get(label, 0) for labels in added.values())))
        rows.append(f"| {' | '.join(cells)} |")
    if len(classes) > MAX_CLASS_ROWS:
        rows.append(f"| … {len(classes) - MAX_CLASS_ROWS} more classes |" + " |" * (len(header) - 1))
    totals = [sum(counts.get(split, {}).values()) for split in splits]
    cells = ["**all**", *(f"{n:,}" for n in totals), f"{sum(totals):,}"]
    if added is not None:
        cells.append(number.format(sum(sum(labels.values()) for labels in added.values())))
    rows.append(f"| {' | '.join(cells)} |")
    return rows


def dataset_markdown(store: DatasetStore, damaged: list[DamagedPart]) -> str:
    manifest = store.manifest()
    rejected = store.rejected()
    lines = [
        f"### Dataset `{manifest['name']}`",
        f"Version {manifest['version']} (`{manifest['version_id']}`): {manifest['num_rows']:,} images, "
        f"{len(manifest['classes'])} classes, {len(manifest['files'])} Parquet files under `{store.root}`.",
        "",
        *counts_table(manifest["counts"]),
        "",
        "| version | id | created | images added | source |",
        "|---:|---|---|---:|---|",
        *(f"| {v['version']} | `{v['version_id']}` | {v['created_at']} | {_added(v)} | `{v['source_uri']}` |"
          for v in manifest["versions"]),
    ]
    if rejected:
        lines += ["", f"**{len(rejected):,} rejected inputs** (first {min(len(rejected), MAX_REJECT_LINES)}):", ""]
        lines += [f"- `{r['source_uri']}` :: `{r['path']}`: {r['reason']} ({r['detail']})" for r in rejected[:MAX_REJECT_LINES]]
    if damaged:
        lines += ["", damage_markdown(store, damaged)]
    return "\n".join(lines) + "\n"


def _added(version: dict) -> str:
    """What a version added: images, or for a relabel version (`ingest --relabel`) the labels it changed."""
    return f"{version['relabelled']:,} relabelled" if version.get("relabelled") else f"{version['rows']:,}"


def verification_markdown(store: DatasetStore, damaged: list[DamagedPart]) -> str:
    if damaged:
        return damage_markdown(store, damaged)
    manifest = store.manifest()
    return (f"Dataset `{manifest['name']}` version {manifest['version']}: all {len(manifest['files'])} Parquet parts "
            f"read, and each of their {manifest['num_rows']:,} images hashes to its sha256.\n")


def damage_markdown(store: DatasetStore, damaged: list[DamagedPart]) -> str:
    lines = [f"**{len(damaged)} damaged Parquet part{'s' if len(damaged) != 1 else ''}**", ""]
    lines += [f"- `{part.path}`: {part.problem}" for part in damaged]
    lines += ["", "To repair:", ""]
    lines += [f"- version {version}: {store.repair(version)}" for version in sorted({part.version for part in damaged})]
    return "\n".join(lines) + "\n"


def classify_markdown(summary) -> str:
    lines = [
        f"### Classified `{summary.source_uri}`",
        f"Model `{summary.model_name}` version `{summary.model_version}`; classify run `{summary.run_id}` "
        "(`classify_run_id` in `predictions`)",
        "",
        f"**{summary.classified:,} classified**, {summary.skipped:,} skipped (already classified), "
        f"{len(summary.rejected):,} rejected, in {summary.seconds:.1f} s ({summary.images_per_second:,.0f} images/s; "
        f"DuckDB commits {summary.commit_seconds:.2f} s).",
    ]
    if summary.class_counts:
        lines += ["", "| label | images |", "|---|---:|",
                  *(f"| {label} | {count:,} |" for label, count in list(summary.class_counts.items())[:MAX_CLASS_ROWS])]
    if summary.rejected:
        lines += ["", "**Rejected**", ""]
        lines += [f"- `{r.path}`: {r.reason} ({r.detail})" for r in summary.rejected[:MAX_REJECT_LINES]]
    return "\n".join(lines) + "\n"


def training_markdown(outcome: TrainingOutcome) -> str:
    """The morning-after report: headline figures, where to look, and what the gate decided."""
    if outcome.fit is None:
        return f"### Retraining skipped\n\n{outcome.skipped}\n"
    result = outcome.fit
    held, split = result.held_out, result.held_out_split
    report = result.extra["report"]
    lines = [
        f"### Training `{outcome.model_name}` version {outcome.model_version}",
        f"MLflow run [`{outcome.run_id}`]({outcome.run_url}), dataset version `{result.dataset_version}`, "
        f"{result.epochs_run} epochs on {result.device}" + (" (stopped early)" if result.stopped_early else ""),
        "",
        "| metric | value |",
        "|---|---:|",
        f"| {split} top-1 | {100 * held['top1']:.2f}% |",
        f"| {split} top-5 | {100 * held['top5']:.2f}% |",
        f"| {split} top-1 error | {100 * (1 - held['top1']):.2f}% |",
        f"| validation top-1 (final epoch) | {100 * result.history[-1]['val_top1']:.2f}% |",
        f"| macro F1 | {report['macro']['f1']:.3f} |",
        f"| expected calibration error | {report['ece']:.3f} |",
    ]
    if "ten_crop_top1" in held:
        lines.append(f"| {split} top-1, ten patches | {100 * held['ten_crop_top1']:.2f}% |")
    if outcome.recipe is not None:
        lines += ["", f"Recipe: {outcome.recipe.line().removeprefix('recipe: ')}."]
    if outcome.started_from:
        lines += ["", f"Weights: {outcome.started_from}."]
    if outcome.leaks:
        lines += ["", outcome.leaks[0].upper() + outcome.leaks[1:] + "."]
    if outcome.warnings:
        lines += ["", "**Warnings**", "", *(f"- {warning}" for warning in outcome.warnings)]
    decision = outcome.decision
    if decision is not None:
        verdict = "**promoted to champion**" if decision.promoted else "**not promoted**"
        lines += ["", f"Gate: {verdict}: {decision.reason}."]
    return "\n".join(lines) + "\n"


def drift_markdown(drift: dict, picture: Path | None = None) -> str:
    """A classify run's drift figures for its Prefect artifact, with its picture inline (the Prefect
    UI cannot reach this machine's files), and where the picture is kept."""
    verdict = "**alert**: a figure passed its threshold" if drift["alert"] else "no alert"
    rows = [("PSI, predicted classes", drift["psi"]), ("Jensen-Shannon distance", drift["js_distance"]),
            ("estimated accuracy", drift["estimated_accuracy"]), ("confidence shift", drift["confidence_shift"]),
            ("low-confidence share", drift["low_confidence_share"]), ("rejected inputs", drift["rejected_rate"]),
            ("size shift", drift["size_shift"]), ("brightness shift", drift["brightness_shift"]),
            ("embedding shift (reference standard deviations)", drift.get("embedding_shift"))]
    return "\n".join([f"### Drift of `{drift['model_name']}` version `{drift['model_version']}`: {verdict}", "",
                      f"{drift['images']:,} images against the version's reference profile "
                      "(`cnnpipe monitor`; thresholds: `cnnpipe monitor thresholds`).", "", "| figure | value |", "|---|---:|",
                      *(f"| {name} | {'' if value is None else f'{value:.3f}'} |" for name, value in rows),
                      *(["", f"![predicted classes and confidence against the reference](data:image/png;base64,"
                             f"{base64.b64encode(picture.read_bytes()).decode()})", "", f"Kept at `{picture}`."]
                        if picture else [])]) + "\n"


AUDIT_ROWS = 10


def audit_markdown(findings: AuditFindings, thumbnails: Path | None = None) -> str:
    """Leaks first (they inflate every figure measured on the held-out splits), then label issues and outliers."""
    twins = findings.twins
    lines = [f"### Audit of `{findings.dataset}`", f"Version `{findings.dataset_version}`, "
             + ", ".join(f"{split} {count:,}" for split, count in sorted(twins.images.items())) + " images.", ""]
    lines += [f"- {line}" for line in twins.lines()]
    leaks = [t for t in twins.twins if t.leak]
    if leaks:
        lines += ["", "| held-out image | split | twin in train | hash bits | embedding distance |", "|---|---|---|---|---|"]
        lines += [f"| `{t.image_sha256[:16]}` | {t.split} | `{t.twin_sha256[:16]}` | {t.hash_distance} | "
                  f"{'-' if t.embedding_distance is None else f'{t.embedding_distance:.3f}'} |" for t in leaks[:AUDIT_ROWS]]
        if len(leaks) > AUDIT_ROWS:
            lines.append(f"\n… and {len(leaks) - AUDIT_ROWS:,} more in the `near_duplicates` table.")
    if thumbnails is not None:
        lines += ["", f"![held-out images and their twins in train](data:image/png;base64,"
                      f"{base64.b64encode(thumbnails.read_bytes()).decode()})", "", f"Kept at `{thumbnails}`."]
    if findings.folds:
        lines += ["", f"**Likely wrong labels: {len(findings.label_issues):,}** (confident learning on "
                      f"{findings.folds}-fold out-of-sample probabilities; fold top-1 "
                      + ", ".join(f"{t:.1%}" for t in findings.fold_top1) + ")", ""]
        if findings.label_issues:
            lines += ["| rank | image | split | given | suggested | label quality |", "|---|---|---|---|---|---|"]
            lines += [f"| {i.rank} | `{i.image_sha256[:16]}` | {i.split} | {i.given_label} | {i.suggested_label} | "
                      f"{i.label_quality:.3f} |" for i in findings.label_issues[:AUDIT_ROWS]]
            lines += ["", f"`cnnpipe review export ./check --label-issues {findings.dataset}` exports them for a "
                          "person, with labels.csv pre-filled with the suggested labels."]
        lines += ["", f"**Outliers: {len(findings.outliers):,}**, the images farthest from their neighbours "
                      "in embedding space (`outliers` table)."]
    else:
        lines += ["", "No folds: label issues and outliers not computed (`--folds 2` trains for them)."]
    return "\n".join(lines) + "\n"
