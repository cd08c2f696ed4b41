"""retrain's default starting point, decided from the registry and the dataset's versions, and
`--init` resolved to weights on this machine."""

from __future__ import annotations

import shutil

import pytest

from cnnpipe.errors import CnnpipeError
from cnnpipe.models import registry
from cnnpipe.models.warm_start import nightly_start, resolve_start


@pytest.fixture
def shapes_in_home(shapes_dataset, cnnpipe_home):
    shutil.copytree(shapes_dataset, cnnpipe_home / "datasets" / "shapes")
    return cnnpipe_home


@pytest.mark.slow
def test_retrain_fine_tunes_a_champion_that_fits_and_says_why_not_otherwise(shapes_in_home, register_version):
    assert nightly_start("n", "shapes", "alexnet-cifar", None, 7) == ("scratch", "from scratch: n has no champion yet")
    champion = register_version("n", 0.5)
    client = registry.client()
    client.set_registered_model_alias("n", "champion", champion.version)
    assert nightly_start("n", "shapes", "alexnet-cifar", None, 7) == (
        "n/1", "fine-tuning champion n v1, trained on shapes version 2")
    assert nightly_start("n", "shapes", "resnet18", None, 7)[1] == (
        "from scratch: champion n v1 is a alexnet-cifar, this run trains a resnet18")
    assert nightly_start("n", "shapes", "alexnet-cifar", 64, 7)[1] == (
        "from scratch: champion n v1 was trained at 32 px, this run's --image-size is 64")
    assert nightly_start("n", "shapes", "alexnet-cifar", None, 7, norm="lrn")[1] == (
        "from scratch: champion n v1 has --norm batch, this run asks for lrn")
    assert nightly_start("n", "shapes", "alexnet-cifar", None, 7, norm="batch")[0] == "n/1"
    # Every Nth version from scratch: here the champion itself started warm, so the 2nd version is due.
    client.set_model_version_tag("n", champion.version, "init", "n v0")
    assert nightly_start("n", "shapes", "alexnet-cifar", None, 2)[1] == (
        "from scratch: every 2nd version does (--scratch-every 2), so that fine-tuning does not drift; "
        "the last 1 started warm")
    assert nightly_start("n", "shapes", "alexnet-cifar", None, 3)[0] == "n/1"
    assert nightly_start("n", "shapes", "alexnet-cifar", None, 1)[0] == "scratch"
    client.set_model_version_tag("n", champion.version, "dataset_version_id", "rebuilt")
    assert nightly_start("n", "shapes", "alexnet-cifar", None, 7)[1] == (
        "from scratch: champion n v1 was trained on shapes `rebuilt`, which is not one of its versions now")
    client.set_model_version_tag("n", champion.version, "dataset", "pets")
    assert nightly_start("n", "shapes", "alexnet-cifar", None, 7)[1] == (
        "from scratch: champion n v1 was trained on dataset pets, not shapes")

    start = resolve_start("champion", "n")
    assert (start.label, start.model_version, start.run_id) == ("n v1", "n/1", champion.run_id)
    assert start.init.startswith(str(shapes_in_home / "cache" / "starting-weights" / "n" / "1"))
    assert resolve_start("n/1", "other").init == start.init


def test_an_init_that_names_nothing_is_refused_in_one_line(cnnpipe_home):
    with pytest.raises(CnnpipeError, match="^--init runs/absent.pt: no such file$"):
        resolve_start("runs/absent.pt", "n")
    with pytest.raises(CnnpipeError, match="^model ghost@champion: not in the registry"):
        resolve_start("ghost@champion", "n")
    assert resolve_start("scratch", "n").warm is False and resolve_start("torchvision", "n").init == "torchvision"
