"""Where a run's weights start: classes matched by name, architectures refused in one line,
torchvision's weights from torch's cache only, and a resumed run that ignores --init."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cnn.config import TrainConfig
from cnn.model import build_model, head_name
from cnn.runs import _build
from cnn.train import fit, plan
from cnn.warm_start import InitError, check, starting_weights, transfer


def _config(model_name: str, image_size: int = 32) -> dict:
    return {"model": model_name, "image_size": image_size, "resize": "crop", "norm": None, "padding": "zeros",
            "pool": "max", "dropout": 0.0}


def _saved(path, model_name: str, classes: list[str], image_size: int = 32, seed: int = 0):
    """A weights.pt as the registry keeps one."""
    torch.manual_seed(seed)
    model = _build(_config(model_name, image_size), len(classes))
    torch.save({"model": model.state_dict(), "classes": classes, "config": _config(model_name, image_size)}, path)
    return model


def test_rows_of_the_classifier_are_matched_by_class_name(tmp_path):
    trained = _saved(tmp_path / "weights.pt", "alexnet-cifar", ["circle", "square", "triangle"])
    start = starting_weights(str(tmp_path / "weights.pt"), "alexnet-cifar")
    torch.manual_seed(1)
    model = _build(_config("alexnet-cifar"), 3)
    fresh_row = model.state_dict()["classifier.7.weight"][2].clone()
    match = transfer(model, start, ["triangle", "circle", "star"], "alexnet-cifar")
    assert match.text() == "2 classes kept, 1 new, 1 dropped"
    ours, theirs = model.state_dict(), trained.state_dict()
    assert head_name(model) == "classifier.7"
    assert torch.equal(ours["classifier.7.weight"][0], theirs["classifier.7.weight"][2])  # triangle
    assert torch.equal(ours["classifier.7.bias"][1], theirs["classifier.7.bias"][0])  # circle
    assert torch.equal(ours["classifier.7.weight"][2], fresh_row)  # star: the row it was built with
    assert all(torch.equal(ours[key], theirs[key]) for key in ours if not key.startswith("classifier.7"))


def test_another_model_or_an_incompatible_shape_is_refused_in_one_line(tmp_path):
    _saved(tmp_path / "cifar.pt", "alexnet-cifar", ["a", "b"])
    start = starting_weights(str(tmp_path / "cifar.pt"), "alexnet")
    with pytest.raises(InitError, match="it is a alexnet-cifar, this run trains a alexnet") as refused:
        check(_build(_config("alexnet", 224), 2), start, ["a", "b"], "alexnet")
    # At 64 px conv1 strides 2 with a 5x5 kernel; the weights were trained with a 3x3 one at 32 px.
    with pytest.raises(InitError, match=r"features.0.weight is 64x3x3x3, this run's alexnet-cifar has 64x3x5x5 "
                                        r".*use --image-size 32") as shaped:
        check(_build(_config("alexnet-cifar", 64), 2), start, ["a", "b"], "alexnet-cifar")
    torch.save({"not": "weights"}, tmp_path / "other.pt")
    with pytest.raises(InitError, match="not a checkpoint or weights.pt of this pipeline") as foreign:
        starting_weights(str(tmp_path / "other.pt"), "alexnet-cifar")
    with pytest.raises(InitError, match="no such file") as missing:
        starting_weights(str(tmp_path / "absent.pt"), "alexnet-cifar")
    assert all("\n" not in str(error.value) for error in (refused, shaped, foreign, missing))


def test_torchvision_weights_missing_from_torch_home_are_named_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(InitError) as missing:
        starting_weights("torchvision", "resnet18")
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    assert str(missing.value) == (f"--init torchvision: ResNet18_Weights.IMAGENET1K_V1 is not in torch's cache: put "
                                  f"resnet18-f37072fd.pth (from https://download.pytorch.org/models/resnet18-f37072fd.pth)"
                                  f" in {cache}, or point TORCH_HOME at a folder whose hub/checkpoints holds it")
    assert not (cache / "resnet18-f37072fd.pth").exists()  # nothing was downloaded, nor tried


@pytest.mark.slow
def test_torchvision_weights_in_torch_home_load_and_train(tiny_shapes_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(3)
    imagenet = build_model("resnet18", 1000).state_dict()
    torch.save(imagenet, cache / "resnet18-f37072fd.pth")
    config = TrainConfig(dataset_dir=str(tiny_shapes_dataset), model="resnet18", init="torchvision", image_size=64,
                         epochs=1, batch_size=32, lr=1e-6, device="cpu", checkpoint_root=str(tmp_path / "runs"))
    assert plan(config).init.text() == "0 classes kept, 4 new, 1000 dropped"
    result = fit(config)
    assert result.extra["init"] == "0 classes kept, 4 new, 1000 dropped" and result.epochs_run == 1
    trained = torch.load(result.checkpoint, weights_only=True)["model"]
    # One step at lr 1e-6 leaves the ImageNet convolutions where they were, not at a fresh init.
    assert torch.allclose(trained["conv1.weight"], imagenet["conv1.weight"], atol=1e-4)
    assert trained["fc.weight"].shape == (4, 512)


def test_a_resumed_run_ignores_init(tiny_shapes_dataset, tmp_path, monkeypatch):
    _saved(tmp_path / "weights.pt", "alexnet-cifar", ["circle", "cross", "square", "triangle"])
    config = TrainConfig(dataset_dir=str(tiny_shapes_dataset), epochs=2, batch_size=32, lr=0.01, device="cpu",
                         checkpoint_root=str(tmp_path / "runs"))
    fresh = plan(replace(config, init=str(tmp_path / "weights.pt")))
    assert fresh.init.text() == "4 classes kept, 0 new, 0 dropped" and fresh.recipe.start == "fine-tune"
    monkeypatch.setenv("FAILPOINT", "train.after_checkpoint")
    monkeypatch.setenv("FAILPOINT_ACTION", "raise")
    with pytest.raises(RuntimeError, match="failpoint"):
        fit(config)
    monkeypatch.delenv("FAILPOINT")
    resumed = plan(replace(config, resume=True, init=str(tmp_path / "weights.pt")))
    assert resumed.init is None and resumed.resuming.epoch == 1 and resumed.recipe.start == "scratch"
    assert any("--init" in warning and "ignored" in warning for warning in resumed.warnings)
