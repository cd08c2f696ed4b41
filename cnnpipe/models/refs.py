"""Model references, what the registry and the predictions database both name versions by.

`NAME@ALIAS` or `NAME/VERSION`; `CHAMPION` and `CHALLENGER` are the aliases the gate moves. A module
of its own so that models/ and predictions/ share them without predictions importing the registry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cnnpipe.errors import CnnpipeError
from cnnpipe.settings import REGISTERED_MODEL

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass(frozen=True)
class ModelRef:
    name: str
    alias: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        return f"{self.name}@{self.alias}" if self.alias else f"{self.name}/{self.version}"


def parse_model_ref(text: str) -> ModelRef:
    """`NAME@ALIAS` or `NAME/VERSION`, with `models:/` optional; a bare NAME means its champion."""
    body = text.strip().removeprefix("models:/")
    match = re.fullmatch(r"([^@/\s]+)(?:@([\w-]+)|/(\d+))?", body)
    if not match:
        raise CnnpipeError(f"{text!r} is not a model reference: use NAME@ALIAS or NAME/VERSION, "
                           f"e.g. {REGISTERED_MODEL}@{CHAMPION} or {REGISTERED_MODEL}/3")
    name, alias, version = match.groups()
    return ModelRef(name, alias or (None if version else CHAMPION), version)


def version_id(version: ModelVersion | None) -> str | None:
    """A version number as text; MLflow hands out ints from some calls and strings from others."""
    return None if version is None else str(version.version)
