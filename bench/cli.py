"""The fixed cost of `cnnpipe` commands, with and without `cnnpipe server` running.

    python bench/cli.py [--repeats 3]

In a temporary $CNNPIPE_HOME, times `cnnpipe ingest` of an empty folder on Prefect's
ephemeral API (no server) and on a running `cnnpipe server`, against the floor any flow
command pays, `python -c "import prefect, cnnpipe.store"`; then `--help`, `server status`,
`sql`, `models`, `promote` and `rollback` (over two versions trained, untimed, on a few
demo shapes) and `classify` of 10 new images with the server, beside the floor that
classifying adds torch to (`import prefect, cnnpipe.store, torch`). With the server, flow
commands run in a fork of its warm worker (`cnnpipe.server.warm`); the rows "own process" run
the same commands with CNNPIPE_WARM=0, as without one. Runs are interleaved so that load from
other processes falls on all of them alike; the table gives medians of wall time and of CPU
time (user + system, the command and its children, which a warm command's fork is not: it is
the worker's), each wall time as a multiple of the import floor measured in the same run, and,
for the commands with a target, whether it is met.

Targets (issue 32): `ingest` of an empty folder, `classify` of 10 images and `sql`, each with
the server, at most 1.5x the import floor. (Issue 15's, met since: `--help`, `sql` and
`server status` under 1 s; `models`, `promote` and `rollback` under 2 s.)
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from cnnpipe.demo import SHAPES, encode, render_shape, write_demo_images  # noqa: E402

CNNPIPE = [sys.executable, "-m", "cnnpipe.cli"]
MODEL = "bench-cli"
FLOOR = 'python -c "import prefect, cnnpipe.store"'
TORCH_FLOOR = 'python -c "import prefect, cnnpipe.store, torch"'
CLASSIFY = "cnnpipe classify 10 new images, cnnpipe server"
COLD_CLASSIFY = "the same in its own process (CNNPIPE_WARM=0)"
# Wall time as a multiple of FLOOR, at most (issue 32).
TARGETS = {"cnnpipe ingest EMPTY, cnnpipe server": 1.5, 'cnnpipe sql "SELECT 42"': 1.5, CLASSIFY: 1.5}


def ten_new_images(folder: Path, seed: int) -> Path:
    """Ten shapes no earlier run has seen, so `classify` classifies rather than skips them."""
    rng = np.random.default_rng(1000 + seed)
    folder.mkdir(parents=True)
    for index in range(10):
        (folder / f"{index}.png").write_bytes(encode(render_shape(SHAPES[index % 4], rng), "PNG"))
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and its children); fails loudly if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stdout}{done.stderr}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="cnnpipe-bench-cli-"))
    empty = scratch / "empty"
    empty.mkdir()
    base = {key: value for key, value in os.environ.items() if key not in ("PREFECT_API_URL", "PREFECT_HOME")}
    base["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    alone = {**base, "CNNPIPE_HOME": str(scratch / "alone"), "PREFECT_HOME": str(scratch / "ephemeral-prefect")}
    served = {**base, "CNNPIPE_HOME": str(scratch / "served")}
    ingest = [*CNNPIPE, "ingest", str(empty), "--dataset", "empty", "--workers", "0"]
    shapes, _ = write_demo_images(scratch / "demo", per_class=20, archive_per_class=0)
    cases = {
        FLOOR: ([sys.executable, "-c", "import prefect, cnnpipe.store"], base),
        TORCH_FLOOR: ([sys.executable, "-c", "import prefect, cnnpipe.store, torch"], base),
        "cnnpipe ingest EMPTY, ephemeral API": (ingest, alone),
        "cnnpipe ingest EMPTY, cnnpipe server": (ingest, served),
        "cnnpipe --help": ([*CNNPIPE, "--help"], served),
        "cnnpipe server status": ([*CNNPIPE, "server", "status"], served),
        'cnnpipe sql "SELECT 42"': ([*CNNPIPE, "sql", "SELECT 42"], served),
        "cnnpipe models": ([*CNNPIPE, "models"], served),
        "cnnpipe promote MODEL 1": ([*CNNPIPE, "promote", MODEL, "1"], served),
        "cnnpipe rollback MODEL": ([*CNNPIPE, "rollback", MODEL], served),
    }
    new_images = iter(ten_new_images(scratch / f"inbox-{index}", index) for index in range(args.repeats))
    cold_images = iter(ten_new_images(scratch / f"cold-inbox-{index}", 100 + index) for index in range(args.repeats))
    cases[CLASSIFY] = (
        lambda: [*CNNPIPE, "classify", str(next(new_images)), "--model", f"{MODEL}/2"], served)
    cases[COLD_CLASSIFY] = (
        lambda: [*CNNPIPE, "classify", str(next(cold_images)), "--model", f"{MODEL}/2"], {**served, "CNNPIPE_WARM": "0"})
    cases["cnnpipe ingest EMPTY, cnnpipe server, own process"] = (ingest, {**served, "CNNPIPE_WARM": "0"})

    began = time.perf_counter()
    timed([*CNNPIPE, "server", "start", "--port", str(free_port()), "--mlflow-port", str(free_port())], served)
    start_seconds = time.perf_counter() - began
    warm_log = scratch / "served" / "server" / "warm.log"
    try:
        # Commands run in their own process until the warm worker has imported the stack.
        deadline = time.monotonic() + 180
        while not (scratch / "served" / "server" / "warm.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        ready_seconds = time.perf_counter() - began
        # Not timed: the first ephemeral run migrates a new database, the first served one warms the server.
        timed(ingest, alone)
        timed(ingest, served)
        # Two registered versions, version 2 the champion, so `promote MODEL 1` then `rollback` each move it.
        timed([*CNNPIPE, "ingest", str(shapes), "--dataset", "shapes"], served)
        for _ in range(2):
            timed([*CNNPIPE, "train", "--dataset", "shapes", "--epochs", "1", "--registered-model", MODEL], served)
        subprocess.run([*CNNPIPE, "promote", MODEL, "2"], env=served, cwd=REPO, capture_output=True)  # unless the gate did
        walls: dict[str, list[float]] = {name: [] for name in cases}
        cpus: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, (argv, env) in cases.items():
                wall, cpu = timed(argv() if callable(argv) else argv, env)
                walls[name].append(wall)
                cpus[name].append(cpu)
    finally:
        began = time.perf_counter()
        timed([*CNNPIPE, "server", "stop"], served)
        stop_seconds = time.perf_counter() - began

    floor = statistics.median(walls[FLOOR])
    torch_floor = statistics.median(walls[TORCH_FLOOR])
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; medians of {args.repeats} runs\n")
    print(f"{'command':<48} {'wall s':>7} {'CPU s':>7} {'x import':>9}  target")
    for name in cases:
        wall = statistics.median(walls[name])
        ratio = wall / floor
        target = f"<= {TARGETS[name]}x {'met' if ratio <= TARGETS[name] else 'NOT met'}" if name in TARGETS else ""
        if name == CLASSIFY:  # against what a classify in its own process imports
            target += f" ({wall / torch_floor:.2f}x the import with torch)"
        print(f"{name:<48} {wall:7.2f} {statistics.median(cpus[name]):7.2f} {ratio:8.2f}x  {target}".rstrip())
    served_lines = [line for line in warm_log.read_text().splitlines() if line.startswith("serving in pid")]
    refused = [line for line in warm_log.read_text().splitlines() if line.startswith("not served")]
    print(f"\ncnnpipe server start (new database): {start_seconds:.1f} s, its warm worker ready after "
          f"{ready_seconds:.1f} s; stop: {stop_seconds:.1f} s")
    print(f"The warm worker served {len(served_lines)} commands and refused {len(refused)}"
          f"{': ' + refused[0] if refused else ''}")
    shutil.rmtree(scratch, ignore_errors=True)  # left behind only when a command failed, to look into


if __name__ == "__main__":
    main()
