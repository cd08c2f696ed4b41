"""Where a training run starts: `--init` resolved to weights on this machine, and retrain's default.

`--init` names `scratch`, `torchvision`, a file, or a registered version (`champion`, `NAME@ALIAS`,
`NAME/VERSION`), whose `weights.pt` is fetched once into the home's cache. `retrain` without
`--init` fine-tunes the champion when its weights fit the run (`nightly_start` says why not
otherwise), and trains every `scratch_every`th version from scratch so that fine-tuning on
fine-tuning does not drift: each version's `init` tag says how it started.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cnn.checkpoint import CheckpointError, load_checkpoint
from cnn.model import NATIVE_SIZES
from cnn.runs import default_norm
from cnn.warm_start import SCRATCH, TORCHVISION
from cnnpipe.errors import CnnpipeError
from cnnpipe.models import registry
from cnnpipe.models.refs import CHAMPION, ModelRef, parse_model_ref
from cnnpipe.settings import Settings, get_settings
from cnnpipe.store import DatasetStore

# The registered version's tag that says where its training started: scratch, or the `label` of a StartingPoint.
INIT_TAG = "init"


@dataclass(frozen=True)
class StartingPoint:
    """`init` for TrainConfig (scratch, torchvision or a file) and, for MLflow, what it came from."""

    init: str = SCRATCH
    label: str = SCRATCH
    # NAME/VERSION and the MLflow run of a registered version started from; empty otherwise.
    model_version: str = ""
    run_id: str = ""

    @property
    def warm(self) -> bool:
        return self.init != SCRATCH

    def params(self) -> dict[str, str]:
        return {"init": self.label, "init_model_version": self.model_version, "init_run_id": self.run_id}


def resolve_start(init: str, registered_model: str, settings: Settings | None = None) -> StartingPoint:
    """What `--init` names, with a registered version's weights fetched to a local file."""
    local = local_init(init)
    if local is not None:
        return StartingPoint(local, local)
    ref = ModelRef(registered_model, alias=CHAMPION) if init == CHAMPION else parse_model_ref(init)
    settings = settings or get_settings()
    version = registry.resolve(registry.client(settings), ref)
    return StartingPoint(str(_fetched_weights(version, settings)), f"{version.name} v{version.version}",
                         f"{version.name}/{version.version}", version.run_id or "")


def local_init(init: str) -> str | None:
    """`init` as TrainConfig takes it when no registry is needed (scratch, torchvision, a file);
    None for a registered version. A file that is not there is refused in one line."""
    if init in (SCRATCH, TORCHVISION):
        return init
    path = Path(init).expanduser()
    if path.is_file():
        return str(path)
    if path.suffix in (".pt", ".pth") or (os.sep in init and not _looks_like_ref(init)):
        raise CnnpipeError(f"--init {init}: no such file")
    return None


def _looks_like_ref(text: str) -> bool:
    try:
        parse_model_ref(text)
    except CnnpipeError:
        return False
    return True


def _fetched_weights(version, settings: Settings) -> Path:
    """The version's weights.pt under the cache: a registered version never changes, so once is enough."""
    folder = settings.starting_weights_dir / version.name / str(version.version)
    weights = folder / registry.WEIGHTS_FILE
    if not weights.is_file():
        partial = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
        try:
            fetched = registry.download_weights(version, partial)
            folder.mkdir(parents=True, exist_ok=True)
            os.replace(fetched, weights)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return weights


def nightly_start(registered_model: str, dataset: str, model: str, image_size: int | None, scratch_every: int,
                  settings: Settings | None = None, norm: str | None = None) -> tuple[str, str]:
    """retrain's `--init` when none is given: the champion as NAME/VERSION when it fits this run,
    else scratch; and why, in one line."""
    settings = settings or get_settings()
    client = registry.client(settings)
    champion = registry.current_champion(client, registered_model)
    if champion is None:
        return SCRATCH, f"from scratch: {registered_model} has no champion yet"
    label = f"champion {registered_model} v{champion.version}"
    store = DatasetStore(dataset, settings)
    if not store.exists():  # training then says so
        return SCRATCH, f"from scratch: there is no dataset {dataset}"
    trained_on = champion.tags.get("dataset", "")
    versions = {v["version_id"]: v["version"] for v in store.manifest()["versions"]}
    if trained_on != dataset:
        return SCRATCH, f"from scratch: {label} was trained on dataset {trained_on or 'unknown'}, not {dataset}"
    if champion.tags.get("dataset_version_id") not in versions:
        return SCRATCH, (f"from scratch: {label} was trained on {dataset} `{champion.tags.get('dataset_version_id')}`, "
                         f"which is not one of its versions now")
    streak = warm_streak(client, registered_model)
    if scratch_every and streak >= scratch_every - 1:
        return SCRATCH, (f"from scratch: every {_ordinal(scratch_every)} version does (--scratch-every "
                         f"{scratch_every}), so that fine-tuning does not drift; the last {streak} started warm")
    start = resolve_start(f"{registered_model}/{champion.version}", registered_model, settings)
    try:
        config = load_checkpoint(Path(start.init)).get("config") or {}
    except CheckpointError as exc:
        return SCRATCH, f"from scratch: the weights of {label} do not load ({exc})"
    theirs = config.get("model")
    if theirs != model:
        return SCRATCH, f"from scratch: {label} is a {theirs}, this run trains a {model}"
    trained_size = config.get("image_size") or NATIVE_SIZES.get(model, 224)
    if image_size and trained_size != image_size:
        return SCRATCH, f"from scratch: {label} was trained at {trained_size} px, this run's --image-size is {image_size}"
    trained_norm = config.get("norm") or default_norm(model)
    if norm and model in NATIVE_SIZES and trained_norm != norm:  # other layers, other weights
        return SCRATCH, f"from scratch: {label} has --norm {trained_norm}, this run asks for {norm}"
    version_number = versions[champion.tags["dataset_version_id"]]
    return start.model_version, f"fine-tuning {label}, trained on {dataset} version {version_number}"


def warm_streak(client, registered_model: str) -> int:
    """How many of the newest versions in a row started from trained weights."""
    streak = 0
    for version in sorted(client.search_model_versions(f"name = '{registered_model}'"),
                          key=lambda v: -int(v.version)):
        if version.tags.get(INIT_TAG, SCRATCH) == SCRATCH:
            break
        streak += 1
    return streak


def _ordinal(number: int) -> str:
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def version_tags(start: StartingPoint) -> dict[str, str]:
    """What a registered version records of where its training started."""
    return {INIT_TAG: start.label, "init_model_version": start.model_version}

