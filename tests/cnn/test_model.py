from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from cnn.model import AlexNet, LocalResponseNorm, build_model, decode_size, input_size


@pytest.mark.parametrize("norm, pool, padding", list(itertools.product(["lrn", "batch", "none"], ["max", "avg"],
                                                                        ["zeros", "replicate"])))
def test_alexnet_cifar_takes_32x32_with_every_option(norm, pool, padding):
    model = build_model("alexnet-cifar", 10, norm=norm, pool=pool, padding=padding, dropout=0.3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3)] * 5 and all(c.padding_mode == padding for c in convs)
    assert any(isinstance(m, {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}[pool]) for m in model.features)


@pytest.mark.parametrize("norm", ["lrn", "batch", "none"])
def test_alexnet_takes_224x224_and_keeps_the_papers_geometry(norm):
    model = build_model("alexnet", 7, norm=norm, padding="replicate")
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 7)
    shapes = []
    x = torch.randn(1, 3, 224, 224)
    for layer in model.features:
        x = layer(x)
        if isinstance(layer, nn.MaxPool2d):
            shapes.append(tuple(x.shape[1:]))
    assert shapes == [(96, 27, 27), (256, 13, 13), (256, 6, 6)]


def test_parameter_count_matches_the_paper_once_its_two_gpu_groups_are_accounted_for():
    model = build_model("alexnet", 1000)
    total = sum(p.numel() for p in model.parameters())
    assert total == 62_378_344
    # The paper split conv2, conv4 and conv5 into two groups (one per GPU): half their weights.
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    grouped_saving = sum(convs[i].weight.numel() // 2 for i in (1, 3, 4))
    assert 60_000_000 < total - grouped_saving < 61_500_000


def test_lrn_matches_a_hand_computation_and_torch():
    x = torch.arange(1.0, 8.0).reshape(1, 7, 1, 1)
    ours = LocalResponseNorm(7, size=5, alpha=1e-4, beta=0.75, k=2.0)(x)
    for c in range(7):
        window = x[0, max(0, c - 2):min(7, c + 3), 0, 0]
        expected = x[0, c, 0, 0] / (2.0 + 1e-4 * (window ** 2).sum()) ** 0.75
        assert torch.isclose(ours[0, c, 0, 0], expected, rtol=1e-6)
    x = torch.randn(3, 64, 9, 9) * 10
    reference = nn.LocalResponseNorm(5, alpha=5 * 1e-4, beta=0.75, k=2.0)(x)
    assert torch.allclose(LocalResponseNorm(64)(x), reference, atol=1e-5)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    assert torch.allclose(LocalResponseNorm(64)(channels_last), reference, atol=1e-5)


@torch.no_grad()
def test_paper_initialisation():
    model = AlexNet(10, norm="lrn")
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [float(c.bias.mean()) for c in convs] == [0.0, 1.0, 0.0, 1.0, 1.0]
    assert all(float(layer.bias.mean()) == 1.0 for layer in linears)
    assert abs(float(linears[0].weight.std()) - 0.01) < 1e-3


@torch.no_grad()
def test_the_batch_norm_variant_starts_near_the_loss_of_chance():
    # Large initial logits made the first epochs of small datasets climb above ln(classes).
    torch.manual_seed(0)
    model = build_model("alexnet-cifar", 4, norm="batch", dropout=0.0).train()
    logits = model(torch.randn(64, 3, 32, 32))
    loss = nn.functional.cross_entropy(logits, torch.randint(0, 4, (64,)))
    assert abs(float(loss) - math.log(4)) < 0.1 and float(logits.std()) < 0.3


def test_any_torchvision_model_by_name_and_clear_errors():
    assert build_model("resnet18", 5)(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    with pytest.raises(ValueError, match="unknown model 'alexnett'"):
        build_model("alexnett", 5)
    with pytest.raises(ValueError, match="norm must be"):
        build_model("alexnet-cifar", 5, norm="group")


def test_crop_224_means_decode_at_256_and_a_small_input_is_its_own_decode_size():
    assert (decode_size(224), decode_size(32)) == (256, 32)
    assert decode_size(input_size(build_model("alexnet-cifar", 5))) == 32


@pytest.mark.parametrize("size", [16, 28, 32, 48, 64, 96, 100, 128, 160, 224])
def test_the_alexnet_family_takes_any_input_size_with_a_stem_that_strides_more_as_it_grows(size):
    # The paper's network is slow to build: two sizes of it are enough.
    for name in ("alexnet-cifar", "alexnet") if size in (28, 100) else ("alexnet-cifar",):
        model = build_model(name, 3, image_size=size).eval()
        assert input_size(model) == size
        with torch.no_grad():
            assert model(torch.randn(2, 3, size, size)).shape == (2, 3)
    conv1 = build_model("alexnet-cifar", 3, image_size=size).features[0]
    expected = {16: 1, 28: 1, 32: 1, 48: 2, 64: 2, 96: 3, 100: 3}.get(size, 4)
    assert conv1.stride == (expected, expected)


def test_a_larger_input_never_costs_less_and_128_px_costs_under_twice_32_px():
    # The recipe weighs sizes by their cost: a cheaper larger size would be an odd stem.
    from torch.utils.flop_counter import FlopCounterMode

    def flops(size: int) -> int:
        with FlopCounterMode(display=False) as counter:
            build_model("alexnet-cifar", 10, image_size=size)(torch.randn(1, 3, size, size))
        return counter.get_total_flops()

    costs = [flops(size) for size in (64, 96, 128, 160, 224)]
    assert costs == sorted(costs) and costs[2] < 2 * flops(32)

