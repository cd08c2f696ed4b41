"""The `cnnpipe` command group, its one-line error boundary and `main`; each command group has its own module.

    data.py       ingest, datasets
    training.py   train, retrain, serve (their options come from `cnnpipe.models.params` through knobs.py)
    models.py     models, promote, rollback
    classify.py   classify, sql, monitor
    review.py     review export
    server.py     server start/stop/status, demo

Heavy imports (torch, prefect, mlflow) happen inside the commands that need them, so
`cnnpipe --help` answers at once.

May import: base, demo, server, sources, store, models, predictions, monitoring, reports.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import click

from cnnpipe.errors import CnnpipeError


class _Cli(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (CnnpipeError, FileNotFoundError, PermissionError) as exc:
            raise click.ClickException(str(exc)) from None
        except Exception as exc:
            # A tracking server that is down or refuses a request: one line, not a traceback.
            if type(exc).__module__.startswith("mlflow"):
                raise click.ClickException(f"MLflow: {str(exc).splitlines()[0]}") from None
            raise


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="cnn-pipeline")
def cli() -> None:
    """Image classification pipeline: ingest, train, classify, and query in SQL.

    State lives under $CNNPIPE_HOME (default ./.cnnpipe). ingest, train and classify
    run as Prefect flows: on Prefect's ephemeral API, or on the server at $PREFECT_API_URL.

    \b
    Examples:
      cnnpipe demo                                   # the whole chain on rendered shapes
      cnnpipe ingest cifar10-jpeg.tar.gz --dataset cifar10
      cnnpipe datasets show cifar10
      cnnpipe train --dataset cifar10 --epochs 30
      cnnpipe models
      cnnpipe classify ./inbox                       # with cnn-classifier@champion
      cnnpipe sql "SELECT label, count(*) FROM latest_predictions GROUP BY label"
      cnnpipe review export review/                  # least confident, to correct and ingest
      cnnpipe serve --dataset cifar10 --source ./incoming --inbox ./inbox
    """


def main() -> None:
    environ = dict(os.environ)
    # With `cnnpipe server` running, a command that needs Prefect, torch or MLflow runs in a fork
    # of its warm worker, which has imported them already; without one, or where its child would
    # not behave as this process would, here.
    from cnnpipe.server import warm
    from cnnpipe.settings import get_settings

    status = warm.run_warm(sys.argv[1:], environ, get_settings().warm_socket)
    if status is not None:
        sys.exit(status)
    warm.launch_environment = environ  # what a worker that `server start` launches must match
    run()


def run() -> None:
    """The command in `sys.argv`, in this process."""
    prepare()
    cli(prog_name="cnnpipe")


def prepare() -> None:
    """Set up the process for a command, before Prefect is imported: it reads its settings once."""
    # Importing torch and Prefect builds a million objects, and the collector rescanning them
    # all, again and again as they arrive, cost a flow command about 0.5 s of start-up. Commands
    # that run long turn it back on once imported (`common.collect_garbage`: every flow command,
    # serve and review export); the others end before cyclic garbage could matter.
    gc.disable()
    # The pipeline makes no outbound calls of its own; Prefect's usage telemetry stays off
    # unless the user turns it on.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Our own progress and warnings go to the same console and run logs as Prefect's.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "cnnpipe")
    # Our own progress bars say what is happening; MLflow's per-download bars only add noise.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # The first run on a busy 2-core machine migrates Prefect's database for longer than the
    # ephemeral server's default 20 s start-up allowance.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # A running `cnnpipe server` spares each flow command the ephemeral API's start-up; Prefect
    # reads PREFECT_API_URL once, when imported, so this comes first.
    from cnnpipe.server.local_server import use_local_server

    use_local_server()
    _ensure_prefect_home()


def _ensure_prefect_home() -> None:
    # Prefect does not create a missing PREFECT_HOME: every command then timed out after 25 s.
    home = os.environ.get("PREFECT_HOME")
    if not home:
        return
    try:
        Path(home).expanduser().mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SystemExit(f"Error: PREFECT_HOME={home} cannot be created: {exc.strerror or exc}")


# Each module lists its commands; `cnnpipe --help` shows them by name.
from cnnpipe.cli import audit, classify, data, models, review, server, training  # noqa: E402

for _module in (data, training, audit, models, classify, review, server):
    for _command in _module.COMMANDS:
        cli.add_command(_command)
