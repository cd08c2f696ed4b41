from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from cnnpipe.cli import cli
from cnnpipe.sources import open_source
from cnnpipe.store import DatasetStore, IngestOptions
from tests.imagefactory import write_class_folders

HEAVY = ("torch", "prefect", "mlflow", "duckdb", "pyarrow")


@pytest.mark.parametrize("argv", [["--help"], ["ingest", "--help"], ["datasets", "--help"], ["sql", "--help"],
                                  ["train", "--help"]])
def test_help_imports_nothing_heavy(argv):
    script = (
        "import sys\nfrom cnnpipe.cli import cli\n"
        f"try:\n    cli({argv!r}, prog_name='cnnpipe')\nexcept SystemExit:\n    pass\n"
        f"print('LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "Examples:" in result.stdout or "Usage:" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "LOADED []"


def test_missing_source_is_one_line_naming_the_file(tmp_path):
    result = CliRunner().invoke(cli, ["ingest", str(tmp_path / "nowhere"), "--dataset", "x"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines == [f"Error: {tmp_path / 'nowhere'}: no such file or folder"]


def test_datasets_with_nothing_ingested_says_how_to_start():
    result = CliRunner().invoke(cli, ["datasets"])
    assert result.exit_code == 0 and "cnnpipe ingest" in result.output
    result = CliRunner().invoke(cli, ["datasets", "show", "ghost"])
    assert result.exit_code == 1 and "no dataset named 'ghost'" in result.output


def ingested(source, name: str = "pets") -> DatasetStore:
    store = DatasetStore(name)
    with store.lock():
        store.commit(store.stage(open_source(str(source)), IngestOptions(workers=0)))
    return store


def test_datasets_piped_prints_whole_values_and_takes_a_format(tmp_path):
    write_class_folders(tmp_path / "src", {"cat": 2, "dog": 1})
    name = "a-dataset-name-long-enough-to-be-cut-by-an-eighty-column-table"
    version_id = ingested(tmp_path / "src", name).manifest()["version_id"]
    command = [sys.executable, "-m", "cnnpipe.cli", "datasets"]
    piped = subprocess.run(command, capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": ""})
    assert piped.returncode == 0, piped.stderr
    assert name in piped.stdout and version_id in piped.stdout
    listed = json.loads(subprocess.run([*command, "--format", "json"], capture_output=True, text=True,
                                       timeout=60).stdout)
    assert [(row["dataset"], row["id"], row["images"], row["classes"]) for row in listed] == \
        [(name, version_id, "3", "2")]


def test_datasets_lists_every_dataset_when_a_manifest_is_corrupted(tmp_path):
    write_class_folders(tmp_path / "src", {"cat": 3})
    (ingested(tmp_path / "src", "a").root / "manifest.json").write_text("{")
    ingested(tmp_path / "src", "b")
    result = CliRunner().invoke(cli, ["datasets"])
    assert result.exit_code == 0, result.output
    assert [line.split()[1] for line in result.output.splitlines() if line.split()[1:2] in (["a"], ["b"])] == ["a", "b"]


def test_datasets_show_checks_footers_and_verify_checks_rows_naming_the_part_and_its_repair(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    write_class_folders(tmp_path / "src", {"cat": 3})
    store = ingested(tmp_path / "src")
    runner = CliRunner()
    verified = runner.invoke(cli, ["datasets", "verify", "pets"])
    assert verified.exit_code == 0 and "3 images" in verified.output
    [part] = store.root.glob("v000001/*.parquet")
    part.write_bytes(part.read_bytes()[:300])
    for command in ("show", "verify"):
        result = runner.invoke(cli, ["datasets", command, "pets"])
        assert result.exit_code == 1, result.output
        assert str(part) in result.output and "Parquet magic bytes not found" in result.output
        assert f"cnnpipe ingest file://{tmp_path / 'src'} --dataset pets" in result.output
        assert result.output.strip().splitlines()[-1].startswith("Error: dataset pets: 1 damaged Parquet part")


@pytest.mark.usefixtures("prefect_harness")
def test_ingest_then_list_and_show(tmp_path):
    write_class_folders(tmp_path / "src", {"cat": 3, "dog": 2})
    (tmp_path / "src" / "dog" / "broken.jpg").write_text("nope")
    runner = CliRunner()
    result = runner.invoke(cli, ["ingest", str(tmp_path / "src"), "--dataset", "pets", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "5 added" in result.output and "dog/broken.jpg" in result.output
    listing = runner.invoke(cli, ["datasets"])
    assert "pets" in listing.output and "5" in listing.output
    shown = runner.invoke(cli, ["datasets", "show", "pets"])
    assert shown.exit_code == 0
    assert "Version 1" in shown.output and "unidentified" in shown.output and "cat" in shown.output


@pytest.mark.slow
def test_models_promote_and_rollback_commands(register_version):
    runner = CliRunner()  # its stdout is not a terminal, as in `cnnpipe models | grep champion`
    assert "No registered models yet" in runner.invoke(cli, ["models"]).output
    register_version("pets", 0.5)
    register_version("pets", 0.75)
    assert runner.invoke(cli, ["promote", "pets", "1"]).output.strip() == "pets: champion is now version 1 (was none)"
    assert runner.invoke(cli, ["promote", "pets", "2"]).exit_code == 0
    listing = runner.invoke(cli, ["models", "pets"])
    assert listing.exit_code == 0, listing.output
    rows = [line for line in listing.output.splitlines() if "pets" in line]
    assert "champion" in rows[0] and "75.00%" in rows[0] and "50.00%" in rows[1]
    listed = list(csv.DictReader(io.StringIO(runner.invoke(cli, ["models", "pets", "--format", "csv"]).output)))
    assert [(row["version"], row["aliases"], row["val top-1"], row["gate"]) for row in listed] == \
        [("2", "champion", "75.00%", "made champion by hand"), ("1", "", "50.00%", "")]
    rolled = runner.invoke(cli, ["rollback", "pets"])
    assert rolled.output.strip() == "pets: champion rolled back from version 2 to 1"
    missing = runner.invoke(cli, ["promote", "pets", "9"])
    assert missing.exit_code == 1 and "model pets/9: not in the registry" in missing.output
    assert runner.invoke(cli, ["models", "ghost"]).output.strip().endswith("no registered model named 'ghost'")


def test_retrain_takes_every_training_option_of_train():
    train, retrain = cli.commands["train"], cli.commands["retrain"]
    train_options = {p.name for p in train.get_params(click.Context(train))} - {"dataset"}
    retrain_options = {p.name for p in retrain.get_params(click.Context(retrain))} - {"dataset", "source", "force",
                                                                                  "scratch_every"}
    assert train_options == retrain_options and {"epochs", "model", "device", "nproc", "resume"} <= train_options


@pytest.mark.slow
def test_a_missing_prefect_home_is_created_and_a_failing_flow_ends_in_one_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    command = [sys.executable, "-m", "cnnpipe.cli", "train", "--dataset", "nosuch"]
    missing = tmp_path / "not" / "yet"
    failed = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PREFECT_HOME": str(missing)})
    assert missing.is_dir() and "Timed out" not in failed.stderr, failed.stderr[-2000:]
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr[-2000:]
    assert [line for line in failed.stderr.splitlines() if "nosuch" in line and "|" not in line] == [
        "Error: no dataset named 'nosuch'; ingest one with `cnnpipe ingest SOURCE --dataset nosuch`"]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=20,
                             env={**os.environ, "PREFECT_HOME": str(tmp_path / "a-file" / "prefect")})
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"Error: PREFECT_HOME={tmp_path / 'a-file' / 'prefect'} cannot be created: Not a directory"]


@pytest.mark.parametrize("command", [["datasets"], ["models"], ["monitor"], ["monitor", "--daily"],
                                     ["sql", "SELECT * FROM near_duplicates"]])
def test_a_script_gets_valid_json_and_csv_on_stdout_even_when_there_is_nothing(command, cnnpipe_home):
    import csv
    import io

    as_json = CliRunner().invoke(cli, [*command, "--format", "json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout) == []
    as_csv = CliRunner().invoke(cli, [*command, "--format", "csv"])
    assert as_csv.exit_code == 0, as_csv.output
    header, *rows = list(csv.reader(io.StringIO(as_csv.stdout)))
    assert rows == [] and header and all(header)


@pytest.mark.parametrize("content, reason", [
    (b"", "unreadable checkpoint (it ends early)"),
    (b"a text file\n", "unreadable checkpoint (not a file that torch.save wrote)"),
    (b"\xff\xd8\xff\xe0 not really a JPEG", "refused, it is not a plain checkpoint"),
])
def test_classify_refuses_a_file_that_is_not_a_checkpoint_in_one_line_before_any_flow(tmp_path, content, reason):
    (tmp_path / "bad.pt").write_bytes(content)
    result = CliRunner().invoke(cli, ["classify", str(tmp_path), "--checkpoint", str(tmp_path / "bad.pt")])
    [line] = result.output.strip().splitlines()
    assert result.exit_code == 1 and line.startswith(f"Error: {tmp_path / 'bad.pt'}: {reason}")


def test_classify_refuses_a_batch_size_below_one_and_a_missing_gpu_in_one_line(tmp_path, monkeypatch):
    result = CliRunner().invoke(cli, ["classify", str(tmp_path), "--batch-size", "0"])
    assert result.exit_code == 2 and "0 is not in the range x>=1" in result.output
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    result = CliRunner().invoke(cli, ["classify", str(tmp_path), "--checkpoint", __file__, "--device", "cuda"])
    assert result.exit_code == 1 and result.output.strip() == "Error: --device cuda: no CUDA device is available here"
