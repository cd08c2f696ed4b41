"""The one summary table of `bench/gpu.sh`, from the JSON its steps wrote; also writes summary.json.

    python bench/gpu_report.py RESULTS_DIR STEPS_TSV [--dry-run]

RESULTS_DIR holds train.json, classify.json, time_to_accuracy.json and device_tests.xml (JUnit),
each written by its step; STEPS_TSV has one line per step: name, exit status, wall seconds.
A step that failed or wrote nothing shows as such: its figures are never filled in.
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path

HEADER = ("section", "figure", "value", "x model-only", "target")


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def read_junit(path: Path) -> dict | None:
    if not path.exists():
        return None
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(suite.get(key, 0)) for suite in suites)
              for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["skip_reasons"] = sorted({skipped.get("message", "") for skipped in root.iter("skipped")})
    return counts


def throughput_rows(section: str, figures: dict) -> list[tuple[str, ...]]:
    return [(section, row["figure"], f"{row['images_per_second']:,.0f} images/s", f"{row['ratio']:.2f}",
             row["target"]) for row in figures["rows"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("steps", type=Path)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    steps = []
    for line in args.steps.read_text().splitlines():
        name, exit_status, seconds = line.split("\t")
        steps.append({"step": name, "exit_status": int(exit_status), "seconds": int(seconds)})
    train = read_json(args.results / "train.json")
    classify = read_json(args.results / "classify.json")
    accuracy = read_json(args.results / "time_to_accuracy.json")
    device_tests = read_junit(args.results / "device_tests.xml")

    rows: list[tuple[str, ...]] = []
    if train:
        rows += throughput_rows("training", train)
    if accuracy:
        seeds = len(accuracy["runs"])
        rows.append(("time to accuracy", f"test top-1, {seeds} seed(s), {accuracy['train_images']:,} train images",
                     f"{100 * accuracy['top1_mean']:.2f} ± {100 * accuracy['top1_std']:.2f}%", "",
                     f">= {100 * accuracy['target_top1']:.0f}%"))
        rows.append(("time to accuracy", "fit wall time, start to end",
                     f"{accuracy['seconds_mean']:.1f} ± {accuracy['seconds_std']:.1f} s", "",
                     f"<= {accuracy['target_seconds']:.0f} s"))
    if classify:
        rows += throughput_rows("classification", classify)
        rows.append(("classification", "DuckDB commit share", f"{100 * classify['commit_share']:.1f}%", "", "< 5%"))
    if device_tests:
        rows.append(("device tests", "pytest -m device",
                     f"{device_tests['passed']} passed, {device_tests['failures'] + device_tests['errors']} failed, "
                     f"{device_tests['skipped']} skipped", "", "all pass on a GPU"))
    for step in steps:
        outcome = "ok" if step["exit_status"] == 0 else f"FAILED (exit {step['exit_status']})"
        rows.append(("steps", step["step"], f"{outcome} in {step['seconds']} s", "", ""))
    total = sum(step["seconds"] for step in steps)
    rows.append(("steps", "total", f"{total} s", "", "< 360 s on an H100/H200"))

    where = next((figures["device"] for figures in (train, classify, accuracy) if figures), "unknown device")
    print(f"\nbench/gpu.sh{' --dry-run (tiny sizes: checks the script, measures nothing)' if args.dry_run else ''} "
          f"on {where}; ratios are against model-only measured in the same run\n")
    widths = [max(len(text) for text in column) for column in zip(HEADER, *rows)]
    print("| " + " | ".join(text.ljust(width) for text, width in zip(HEADER, widths)) + " |")
    print("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    for row in rows:
        print("| " + " | ".join(text.ljust(width) for text, width in zip(row, widths)) + " |")
    (args.results / "summary.json").write_text(json.dumps({
        "dry_run": args.dry_run, "steps": steps, "train": train, "classify": classify, "time_to_accuracy": accuracy,
        "device_tests": device_tests}, indent=2))


if __name__ == "__main__":
    main()
