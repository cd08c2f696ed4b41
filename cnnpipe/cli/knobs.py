"""The training knobs as click options, generated from `cnnpipe.models.params.TrainingParams` when a command needs them."""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin

import click

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo

    from cnnpipe.models.params import TrainingParams

# `--resume` alone continues the latest unfinished run, `--resume PATH` the run at PATH.
RESUME_LATEST = "latest"


class TrainingCommand(click.Command):
    """A command that also takes every training knob as an option (`knobs` says which not, and
    `flags` renames a flag that would clash). The options are made when first needed, to parse
    or to show help: pydantic takes 0.2 s to import, which `cnnpipe --help` should not pay."""

    def __init__(self, *args: Any, without: tuple[str, ...] = (), flags: dict[str, str] | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._without, self._flags, self._made = without, flags or {}, False

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if not self._made:
            self.params += knob_options(self._without, self._flags)
            self._made = True
        return super().get_params(ctx)


def knob_options(without: tuple[str, ...] = (), flags: dict[str, str] | None = None) -> list[click.Option]:
    """One option per field of TrainingParams, in its order: flag, type or choices, default and help."""
    from cnn.config import flag
    from cnnpipe.models.params import TrainingParams

    return [click.Option([(flags or {}).get(name, flag(name)), name], **_settings(name, field))
            for name, field in TrainingParams.model_fields.items() if name not in without]


def _settings(name: str, field: FieldInfo) -> dict[str, Any]:
    if name == "resume":
        return {"is_flag": False, "flag_value": RESUME_LATEST, "default": None, "metavar": "[PATH]",
                "help": "Continue the latest unfinished run of this dataset and model, or the run at PATH."}
    kind = _without_none(field.annotation)
    if kind is bool:
        return {"is_flag": True, "default": field.default, "help": field.description}
    return {"type": click.Choice(get_args(kind)) if get_origin(kind) is Literal else kind,
            "default": field.default, "show_default": field.default is not None, "help": field.description}


def _without_none(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        (kind,) = [arg for arg in get_args(annotation) if arg is not type(None)]
        return kind
    return annotation


def training_params(knobs: dict[str, Any]) -> TrainingParams:
    """The TrainingParams of a command's knob options; an impossible setting fails in one line naming its flag."""
    from cnnpipe.models.params import TrainingParams

    resume = knobs.get("resume")
    params = TrainingParams(**{**knobs, "resume": True if resume == RESUME_LATEST else (resume or False)})
    try:
        params.config(dataset_dir="")
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    return params
