"""The champion gate and its history: which registered version serves, and every move of it.

The `champion` alias moves only under a per-model file lock, after checking that it still
points where the decision assumed (compare-and-set), and every move is recorded in the
`promotions` table of the predictions database.

That database sets aside a write-ahead log it cannot replay, since predictions can be computed
again; a promotion cannot. So a move is written and checkpointed into the database file before
the alias moves, and taken back if the alias cannot move: a log set aside later holds no
promotion. A move killed before its alias moved is taken out of the history by the next gate,
promotion or rollback of that model.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from cnn.layout import PublishedDataset
from cnnpipe.base.locks import file_lock
from cnnpipe.errors import CnnpipeError
from cnnpipe.models.majority import MAJORITY_ALPHA, majority_test
from cnnpipe.models.refs import CHALLENGER, CHAMPION, ModelRef, version_id
from cnnpipe.models.registry import (GATE_METRIC, current_champion, describe_version, download_weights, light_client,
                                     resolve)
from cnnpipe.predictions.database import connect_for_writing, transaction
from cnnpipe.predictions.records import finite_or_null, set_champion
from cnnpipe.settings import Settings, get_settings

if TYPE_CHECKING:  # the mlflow package takes seconds to import: only the commands that need it pay
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient

log = logging.getLogger("cnnpipe.registry")


@dataclass
class GateDecision:
    model_name: str
    challenger: str
    champion: str | None
    challenger_top1: float
    champion_top1: float | None
    promoted: bool
    reason: str
    majority_rate: float | None = None
    val_images: int | None = None
    p_value: float | None = None
    beats_majority: bool | None = None


def _lock(name: str, settings: Settings):
    return file_lock(settings.locks_dir / f"registry-{name}.lock",
                     waiting=f"waiting for another promotion of {name}")


def champion_score(mlflow_client: MlflowClient, champion: ModelVersion, dataset_dir: Path,
                   dataset_version_id: str, device: str = "cpu") -> tuple[float, str]:
    """The champion's validation top-1 on this dataset version: as recorded only when it was measured
    on this very dataset and version (ids of two datasets can match), else re-evaluated here.
    A ValueError says why it cannot be measured here, e.g. it knows other classes."""
    dataset = PublishedDataset.open(dataset_dir).name
    tags = champion.tags
    same_dataset = tags.get("dataset") == dataset
    if same_dataset and tags.get("dataset_version_id") == dataset_version_id and GATE_METRIC in tags:
        return float(tags[GATE_METRIC]), "as recorded"
    from cnn.runs import evaluate_checkpoint

    with tempfile.TemporaryDirectory(prefix="cnnpipe-champion-") as scratch:
        weights = download_weights(champion, Path(scratch))
        figures = evaluate_checkpoint(weights, dataset_dir, device)
    log.info("re-evaluated champion %s/%s on dataset %s version %s: val top-1 %.4f", champion.name, champion.version,
             dataset, dataset_version_id, figures["top1"])
    where = "" if same_dataset else f", not {_trained_on(champion)} it was trained on"
    return figures["top1"], f"re-evaluated on dataset {dataset} version {dataset_version_id}{where}"


def _trained_on(version: ModelVersion) -> str:
    return f"dataset {version.tags.get('dataset') or '?'} version {version.tags.get('dataset_version_id') or '?'}"


def gate(mlflow_client: MlflowClient, challenger: ModelVersion, challenger_top1: float, dataset_dir: Path,
         dataset_version_id: str, min_improvement: float = 0.0, device: str = "cpu", *,
         alpha: float = MAJORITY_ALPHA, settings: Settings | None = None) -> GateDecision:
    """Make `challenger` the champion only if its validation top-1 clearly beats the majority-class
    rate of the validation split (one-sided exact binomial test at `alpha`) and beats the champion's
    by more than nothing and by at least `min_improvement`, both measured on the same split."""
    name = challenger.name
    settings = settings or get_settings()
    majority = majority_test(challenger_top1, dataset_dir, alpha)
    with _lock(name, settings):
        _settle_interrupted_move(mlflow_client, name, settings)
        mlflow_client.set_registered_model_alias(name, CHALLENGER, challenger.version)
        champion = current_champion(mlflow_client, name)
        champion_top1 = None
        if champion is None:
            promoted = majority.passed
            reason = f"val top-1 {challenger_top1:.4f} {majority.clause}"
            if promoted:
                reason = f"first champion: {reason}"
        elif version_id(champion) == version_id(challenger):
            promoted, reason = False, "already the champion"
        else:
            try:
                champion_top1, how = champion_score(mlflow_client, champion, dataset_dir, dataset_version_id, device)
            except ValueError as exc:  # the champion cannot be measured on this dataset
                promoted = False
                reason = (f"not comparable with champion {champion.version}, trained on {_trained_on(champion)}: "
                          f"{exc}; use `cnnpipe promote {name} {challenger.version}` to switch anyway")
            else:
                gain = challenger_top1 - champion_top1
                better = gain > 0 and gain >= min_improvement
                promoted = better and majority.passed
                verdict = "beats" if better else "does not beat"
                required = f" by at least {min_improvement:g}" if min_improvement > 0 else ""
                joint = " and" if better == majority.passed else ", but"
                reason = (f"val top-1 {challenger_top1:.4f} {verdict} champion {champion.version}'s "
                          f"{champion_top1:.4f} ({how}){required}{joint} {majority.clause}")
        if promoted:
            _move_champion(mlflow_client, name, champion, challenger.version, challenger_top1, champion_top1,
                           "better" if champion else "first", settings)
        describe_version(mlflow_client, challenger, {
            "gate.decision": "promoted" if promoted else "rejected", "gate.reason": reason,
            "gate.champion_version": version_id(champion) or "",
            "gate.champion_val_top1": "" if champion_top1 is None else f"{champion_top1:.6f}",
            **majority.tags(),
        })
    decision = GateDecision(name, version_id(challenger), version_id(champion), challenger_top1, champion_top1,
                            promoted, reason, majority.majority_rate, majority.n, majority.p_value, majority.passed)
    log.info("gate for %s/%s: %s (%s)", name, challenger.version, "promoted" if promoted else "kept champion", reason)
    return decision


def _move_champion(mlflow_client: MlflowClient, name: str, expected: ModelVersion | None, to_version: str,
                   to_value: float | None, from_value: float | None, reason: str, settings: Settings) -> None:
    """Compare-and-set: move `champion` only if it still points at `expected`, recorded durably first."""
    now = current_champion(mlflow_client, name)
    if version_id(now) != version_id(expected):
        raise CnnpipeError(f"{name}: the champion changed to {version_id(now) or 'none'} during the decision; "
                           "run the gate again")
    database = settings.predictions_db
    promoted_at = datetime.now(timezone.utc)
    with transaction(database, checkpoint=True) as connection:
        connection.execute("INSERT INTO promotions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           [promoted_at, name, version_id(expected), str(to_version), GATE_METRIC,
                            finite_or_null(from_value), finite_or_null(to_value), reason])
        set_champion(connection, name, str(to_version))
    try:
        mlflow_client.set_registered_model_alias(name, CHAMPION, to_version)
    except BaseException:
        _take_back(database, name, promoted_at, version_id(expected))
        raise


def _take_back(database: Path, name: str, promoted_at: datetime, champion: str | None) -> None:
    with transaction(database, checkpoint=True) as connection:
        connection.execute("DELETE FROM promotions WHERE model_name = ? AND promoted_at = ?", [name, promoted_at])
        set_champion(connection, name, champion)


def _settle_interrupted_move(mlflow_client: MlflowClient, name: str, settings: Settings) -> None:
    """A move killed between its record and the alias leaves the history one step ahead of the
    alias; that step never happened, so it is taken back. Called under the model's lock."""
    champion = version_id(current_champion(mlflow_client, name))
    with connect_for_writing(settings.predictions_db) as connection:
        last = connection.execute("SELECT promoted_at, from_version, to_version FROM promotions WHERE model_name = ? "
                                  "ORDER BY promoted_at DESC LIMIT 1", [name]).fetchone()
    if last is None or last[2] == champion or last[1] != champion:
        return
    _take_back(settings.predictions_db, name, last[0], champion)
    log.warning("%s: the move of champion from %s to %s was interrupted before the alias moved; took it out of "
                "the history", name, last[1] or "none", last[2])


def _tagged_top1(version: ModelVersion | None) -> float | None:
    if version is None or GATE_METRIC not in version.tags:
        return None
    return float(version.tags[GATE_METRIC])


def _move_by_hand(mlflow_client: MlflowClient, name: str, champion: ModelVersion | None, target: ModelVersion,
                  reason: str, settings: Settings) -> GateDecision:
    _move_champion(mlflow_client, name, champion, target.version, _tagged_top1(target), _tagged_top1(champion), reason,
                   settings)
    return GateDecision(name, version_id(target), version_id(champion), _tagged_top1(target) or math.nan,
                        _tagged_top1(champion), True, reason)


def promote(name: str, version: str, reason: str = "manual", settings: Settings | None = None) -> GateDecision:
    """Make `version` the champion by hand; recorded in the history with `reason`."""
    settings = settings or get_settings()
    mlflow_client = light_client(settings)
    with _lock(name, settings):
        _settle_interrupted_move(mlflow_client, name, settings)
        target = resolve(mlflow_client, ModelRef(name, version=str(version)))
        champion = current_champion(mlflow_client, name)
        if version_id(champion) == version_id(target):
            raise CnnpipeError(f"{name}/{version} is already the champion")
        return _move_by_hand(mlflow_client, name, champion, target, reason, settings)


def champion_history(name: str, settings: Settings | None = None) -> list[str]:
    """Champions in order, as promotions and rollbacks left them; the last is the current one."""
    with connect_for_writing((settings or get_settings()).predictions_db) as connection:
        promotions = connection.execute("SELECT to_version, reason FROM promotions WHERE model_name = ? "
                                        "ORDER BY promoted_at", [name]).fetchall()
    stack: list[str] = []
    for to_version, reason in promotions:
        if reason == "rollback":
            stack.pop()
        else:
            stack.append(to_version)
    return stack


def rollback(name: str, settings: Settings | None = None) -> GateDecision:
    """Move `champion` back to the version that held it before the current one."""
    settings = settings or get_settings()
    mlflow_client = light_client(settings)
    with _lock(name, settings):
        _settle_interrupted_move(mlflow_client, name, settings)
        champion = current_champion(mlflow_client, name)
        if champion is None:
            raise CnnpipeError(f"{name} has no champion to roll back")
        history = champion_history(name, settings)
        if len(history) < 2 or history[-1] != version_id(champion):
            raise CnnpipeError(f"{name}: no earlier champion in the promotion history (current: {version_id(champion)})")
        target = resolve(mlflow_client, ModelRef(name, version=history[-2]))
        return _move_by_hand(mlflow_client, name, champion, target, "rollback", settings)
