from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

# Tests make no outbound connections, Prefect's telemetry included, and leave ~/.prefect alone.
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="cnnpipe-tests-prefect-")
os.environ.pop("PREFECT_API_URL", None)
# Under pytest-xdist two workers share two cores: torch at one thread a worker (and in the processes
# tests start), since two trainings at two threads each ran several times slower than in turn.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CNNPIPE_SHARED", REPO.parent / "shared"))
CIFAR_TARBALL = SHARED / "data" / "cifar10-jpeg.tar.gz"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules holding a `minutes` test first, each kept whole (its module fixtures are set up once):
    xdist hands tests out in this order, and a test of minutes started last would leave the other
    worker idle that long. `device` tests skip where there is no GPU, so the suite passes on any machine."""
    long_modules = {item.module for item in items if item.get_closest_marker("minutes")}
    # Of those, one that needs the session's trained shapes model first: built early, while the other
    # worker runs the groups, it is ready by the time that worker's tests ask for it, not awaited.
    building = {item.module for item in items if "trained_on_shapes" in item.fixturenames} & long_modules
    items.sort(key=lambda item: (item.module not in long_modules, item.module not in building))
    marked = [item for item in items if item.get_closest_marker("device")]
    if not marked:
        return
    import torch

    if not torch.cuda.is_available():
        for item in marked:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(autouse=True)
def cnnpipe_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "cnnpipe-home"
    monkeypatch.setenv("CNNPIPE_HOME", str(home))
    from cnn import failpoints

    failpoints.reset()
    for name in ("FAILPOINT", "FAILPOINT_AFTER", "FAILPOINT_ACTION", "FAILPOINT_KEY", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session; yields its URL for child processes."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield PREFECT_API_URL.value()


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> object:
    """What `build(folder)` returns, built by the first pytest-xdist worker that asks and read
    back by the others: a session fixture otherwise runs once in every worker."""
    from cnnpipe.base.locks import file_lock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the base temp folder all of this run's workers share
    folder, answer = root / name, root / f"{name}.pickle"
    with file_lock(root / f"{name}.lock"):
        if not answer.exists():
            folder.mkdir(exist_ok=True)
            value = build(folder)
            answer.write_bytes(pickle.dumps(value))
            return value
    return pickle.loads(answer.read_bytes())


def _ingest(home: Path, name: str, sources) -> Path:
    from cnnpipe.settings import Settings
    from cnnpipe.sources import open_source
    from cnnpipe.store import DatasetStore, IngestOptions

    store = DatasetStore(name, Settings(home=home, mlflow_tracking_uri=""))
    for source in sources:
        with store.lock():
            store.commit(store.stage(open_source(str(source)), IngestOptions(workers=0)))
    return home / "datasets" / name


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory) -> Path:
    """The demo's rendered shapes, ingested once for all training tests (800 images, 4 classes)."""
    from cnnpipe.demo import write_demo_images

    return built_once(tmp_path_factory, "shapes-home",
                      lambda home: _ingest(home, "shapes", write_demo_images(home / "demo")))


@pytest.fixture(scope="session")
def tiny_shapes_dataset(tmp_path_factory) -> Path:
    """A dataset `shapes` of rendered shapes in train/val/test folders, 12/4/4 a class: two batches
    of 32 an epoch, for tests of how training runs (seeds, resume, kills, DDP, flows) rather than of
    how well it learns."""
    from cnnpipe.demo import SHAPES, encode, render_shape

    def build(home: Path) -> Path:
        import numpy as np

        rng = np.random.default_rng(7)
        for split, count in (("train", 12), ("val", 4), ("test", 4)):
            for shape in SHAPES:
                folder = home / "source" / split / shape
                folder.mkdir(parents=True)
                for index in range(count):
                    (folder / f"{index:02d}.png").write_bytes(encode(render_shape(shape, rng), "PNG"))
        return _ingest(home, "shapes", [home / "source"])

    return built_once(tmp_path_factory, "tiny-shapes-home", build)


needs_cifar = pytest.mark.skipif(not CIFAR_TARBALL.exists(), reason=f"{CIFAR_TARBALL} is absent (fresh clone)")


@pytest.fixture(scope="session")
def shapes_checkpoints(shapes_dataset, tmp_path_factory) -> list[Path]:
    """Two checkpoints (after epochs 1 and 2) of alexnet-cifar trained on the shapes."""
    from cnn.config import TrainConfig
    from cnn.train import fit

    def build(root: Path) -> list[Path]:
        result = fit(TrainConfig(dataset_dir=str(shapes_dataset), epochs=2, batch_size=32, lr=0.01, dropout=0.2,
                                 device="cpu", checkpoint_root=str(root)))
        return sorted(Path(result.run_dir).glob("epoch-*.pt"))

    return built_once(tmp_path_factory, "shapes-checkpoints", build)


@pytest.fixture(scope="session")
def trained_on_shapes(shapes_dataset, tmp_path_factory):
    """`fit`'s result for alexnet-cifar trained on the shapes with the automatic recipe, 15 epochs:
    a model that has learned them, for the tests that need one (training's own smoke test, drift)."""
    from cnn.config import TrainConfig
    from cnn.train import fit

    return built_once(tmp_path_factory, "trained-on-shapes", lambda root: fit(TrainConfig(
        dataset_dir=str(shapes_dataset), device="cpu", epochs=15, checkpoint_root=str(root))))


@pytest.fixture
def register_version(shapes_dataset, shapes_checkpoints):
    """Register a version of an alexnet-cifar trained on the shapes, with the figures a test chooses."""
    from cnn.train import FitResult
    from cnnpipe.models import registry, tracking

    def register(name: str, val_top1: float, dataset_version_id: str | None = None, checkpoint: Path | None = None):
        checkpoint = checkpoint or shapes_checkpoints[-1]
        manifest_version = json.loads((shapes_dataset / "manifest.json").read_text())["version_id"]
        dataset_version_id = dataset_version_id or manifest_version
        result = FitResult(str(checkpoint.parent), str(checkpoint), ["circle", "cross", "square", "triangle"], [], {},
                           "test", val_top1, 1, 0, "cpu", dataset_version_id)
        tracking.connect()
        with tracking.training_run(f"test {name}", {}):
            version = tracking.log_model(result, name)
        registry.describe_version(registry.client(), version, {
            "dataset": "shapes", "dataset_version_id": dataset_version_id, registry.GATE_METRIC: val_top1})
        return registry.client().get_model_version(name, str(version.version))

    return register
