"""`flow`, Prefect's decorator for every flow of the pipeline, less two costs that a short command
paid on each run without any use of them:

- Prefect sends a flow's parameters to its API through FastAPI's `jsonable_encoder`, and
  importing FastAPI for it took 0.2 to 0.3 s of a `cnnpipe ingest` or `classify`, a fifth of
  all it did beyond importing Prefect. Parameters that are plain JSON already (strings,
  numbers, booleans, None, and lists, tuples and string-keyed dicts of them) are sent as
  `jsonable_encoder` would send them, without it; any other value takes Prefect's own path.
- A flow run ended by joining its heartbeat thread, which sleeps in whole seconds between
  checks that it should stop: every run waited up to a second for nothing. Heartbeats are
  still sent, every `PREFECT_FLOWS_HEARTBEAT_FREQUENCY` seconds; the thread, a daemon,
  stops at its next check unwaited for, as Prefect's asynchronous flows already leave it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import prefect.flow_engine
from prefect.flows import Flow

_PLAIN = (str, int, float, bool, type(None))


class PipelineFlow(Flow):
    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        if all(_is_plain(value) for value in parameters.values()):
            return {key: _plain(value) for key, value in parameters.items()}
        return super().serialize_parameters(parameters)


def _is_plain(value: Any, depth: int = 0) -> bool:
    kind = type(value)
    if kind in _PLAIN:
        return True
    if depth > 8:
        return False
    if kind in (list, tuple):
        return all(_is_plain(item, depth + 1) for item in value)
    if kind is dict:
        return all(type(key) is str and _is_plain(item, depth + 1) for key, item in value.items())
    return False


def _plain(value: Any) -> Any:
    """What `jsonable_encoder` makes of a value `_is_plain` accepts."""
    kind = type(value)
    if kind in (list, tuple):
        return [_plain(item) for item in value]
    if kind is dict:
        return {key: _plain(item) for key, item in value.items()}
    return value


def flow(__fn=None, **options):
    """`prefect.flow`, making a `PipelineFlow`."""
    if __fn is None:
        return lambda fn: PipelineFlow(fn, **options)
    return PipelineFlow(__fn, **options)


def _heartbeats_unjoined():
    original = getattr(prefect.flow_engine, "_send_heartbeats", None)
    if original is None or getattr(original, "_unjoined", False):
        return

    @contextmanager
    def send_heartbeats(engine, join_on_exit: bool = True):
        with original(engine, join_on_exit=False):
            yield

    send_heartbeats._unjoined = True
    prefect.flow_engine._send_heartbeats = send_heartbeats


_heartbeats_unjoined()
