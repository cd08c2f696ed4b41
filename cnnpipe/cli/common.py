"""What the command groups share: Markdown output, listing formats, and what runs before a command's flows."""

from __future__ import annotations

from pathlib import Path

# What `models` and `datasets` print: whole values always, piped or not.
LISTING_FORMATS = ("table", "csv", "json")


def print_markdown(text: str) -> None:
    from rich.console import Console
    from rich.markdown import Markdown

    Console().print(Markdown(text))


def before_flows() -> None:
    """What every command that runs flows needs first, after its cheap one-line checks: starting
    Prefect prints lines of its own, which a bad argument should never be preceded by."""
    collect_garbage()
    _errors_in_one_line()
    _start_prefect_in_turn()


def collect_garbage() -> None:
    """Turn the collector that `main` turned off back on, for a command whose imports are done.
    What exists now is frozen out of every later collection: nearly all of it lives as long as
    the process, and collecting the rest (some 14,000 objects of import-time garbage) would
    cost the 0.3 s that turning the collector off saved."""
    import gc

    gc.freeze()
    gc.enable()


class _NoFlowErrors:
    """Drops a failing flow's or task's error records, traceback and all, from the terminal:
    the command ends with one `Error:` line, and the records stay in the run's logs."""

    def filter(self, record) -> bool:
        return not (record.levelno >= 40 and record.name.startswith(("prefect.flow_runs", "prefect.task_runs")))


def _errors_in_one_line() -> None:
    """For the commands that run flows, once Prefect has set up its console handler."""
    import logging

    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "PrefectConsoleHandler" and not any(
                isinstance(f, _NoFlowErrors) for f in handler.filters):
            handler.addFilter(_NoFlowErrors())


def _start_prefect_in_turn() -> None:
    """Start the ephemeral Prefect server that this command's flows will use, one process at a
    time: each start migrates Prefect's database, and two first starts at once on a fresh
    PREFECT_HOME collide ("index ... already exists"), as a cron starting two commands would."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    # Imported only now: Prefect's server app takes seconds to import, and a command that
    # talks to `cnnpipe server` never needs it.
    from prefect.server.api.server import SubprocessASGIServer

    from cnnpipe.base.locks import file_lock

    with file_lock(Path(PREFECT_HOME.value()) / "cnnpipe-server-start.lock",
                   waiting="waiting for another cnnpipe command to start Prefect's server"):
        SubprocessASGIServer().start()
