"""The AlexNet family (Krizhevsky, Sutskever and Hinton, 2012) and a registry of models.

`alexnet` is the paper's network for 224x224 input on one device: the paper split conv2,
conv4 and conv5 into two groups, one per GPU, which is why it counts 60 M parameters
where this ungrouped network has 62.4 M at 1000 classes. `alexnet-cifar` keeps the design
(five convolutions, overlapping pooling, normalisation, two dropout FC layers) at 32x32.
Any torchvision classification model is available by name, with random weights.
"""

from __future__ import annotations

import torch
from torch import nn

from cnn.config import NORMS, PADDINGS, POOLS


class LocalResponseNorm(nn.Module):
    """The paper's LRN, b = a / (k + alpha * sum over n neighbouring channels of a^2)^beta.

    The neighbourhood sum is one matrix product with a banded 0/1 matrix, which runs at
    GEMM speed on channels-last tensors, where `torch.nn.LocalResponseNorm` (which also
    divides alpha by n) pads and pools. The two agree with alpha scaled by n.
    """

    def __init__(self, channels: int, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0):
        super().__init__()
        index = torch.arange(channels)
        band = ((index[:, None] - index[None, :]).abs() <= size // 2).float()
        self.register_buffer("band", band, persistent=False)
        self.alpha, self.beta, self.k = alpha, beta, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squares = (x * x).movedim(1, -1)
        summed = (squares @ self.band.to(squares.dtype)).movedim(-1, 1)
        return x * (self.k + self.alpha * summed).pow(-self.beta)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "lrn":
        return LocalResponseNorm(channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {', '.join(NORMS)}, not {kind!r}")


def _pool(kind: str, padding: int = 0) -> nn.Module:
    # Overlapping pooling: 3x3 windows every 2 pixels.
    if kind == "max":
        return nn.MaxPool2d(3, 2, padding)
    if kind == "avg":
        return nn.AvgPool2d(3, 2, padding, count_include_pad=False)
    raise ValueError(f"pool must be one of {', '.join(POOLS)}, not {kind!r}")


def _conv_block(c_in: int, c_out: int, kernel: int, stride: int, padding: int, padding_mode: str,
                norm: str, normalise: bool) -> list[nn.Module]:
    if padding_mode not in PADDINGS:
        raise ValueError(f"padding must be one of {', '.join(PADDINGS)}, not {padding_mode!r}")
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, padding_mode=padding_mode)
    if norm == "batch":
        return [conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    # The paper normalises after the ReLU of conv1 and conv2 only.
    return [conv, nn.ReLU(inplace=True)] + ([_norm(norm, c_out)] if normalise and norm == "lrn" else [])


class AlexNet(nn.Module):
    def __init__(self, num_classes: int = 1000, *, widths=(96, 256, 384, 384, 256), fc: int = 4096,
                 small_input: bool = False, padding: str = "zeros", pool: str = "max",
                 norm: str = "lrn", dropout: float = 0.5):
        super().__init__()
        _norm(norm, 1)  # validates the option before building anything
        w1, w2, w3, w4, w5 = widths
        if small_input:  # 32x32: 3x3 kernels, stride 1, pooling padded to halve exactly
            geometry, pool_padding, grid = [(3, 1, 1), (3, 1, 1)], 1, 4
        else:  # 224x224: 11x11 stride 4, then 5x5
            geometry, pool_padding, grid = [(11, 4, 2), (5, 1, 2)], 0, 6
        (k1, s1, p1), (k2, s2, p2) = geometry
        self.features = nn.Sequential(
            *_conv_block(3, w1, k1, s1, p1, padding, norm, normalise=True), _pool(pool, pool_padding),
            *_conv_block(w1, w2, k2, s2, p2, padding, norm, normalise=True), _pool(pool, pool_padding),
            *_conv_block(w2, w3, 3, 1, 1, padding, norm, normalise=False),
            *_conv_block(w3, w4, 3, 1, 1, padding, norm, normalise=False),
            *_conv_block(w4, w5, 3, 1, 1, padding, norm, normalise=False), _pool(pool, pool_padding),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout), nn.Linear(w5 * grid * grid, fc), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(fc, fc), nn.ReLU(inplace=True),
            nn.Linear(fc, num_classes),
        )
        self.input_size = 32 if small_input else 224
        self._init_as_in_the_paper()

    def _init_as_in_the_paper(self) -> None:
        # N(0, 0.01) weights; biases 1 in conv2, conv4, conv5 and the FC layers (0 elsewhere),
        # which gives the ReLUs positive inputs early on.
        convs = [m for m in self.features if isinstance(m, nn.Conv2d)]
        linears = [m for m in self.classifier if isinstance(m, nn.Linear)]
        for index, layer in enumerate(convs + linears):
            nn.init.normal_(layer.weight, 0.0, 0.01)
            nn.init.constant_(layer.bias, 1.0 if index in (1, 3, 4) or layer in linears else 0.0)
        if any(isinstance(m, nn.BatchNorm2d) for m in self.features):
            # With batch norm, the paper's tiny init only slows training: Kaiming for the
            # convolutions. The hidden FC layers keep PyTorch's fan-in default: Kaiming there,
            # on pooled features far from zero mean, made the loss climb above ln(classes) in
            # the first epochs on the demo's shapes.
            for layer in convs:
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                nn.init.zeros_(layer.bias)
            for layer in linears[:-1]:
                layer.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


MODELS = {
    "alexnet": lambda classes, **options: AlexNet(classes, **options),
    "alexnet-cifar": lambda classes, **options: AlexNet(
        classes, widths=(64, 192, 384, 256, 256), fc=1024, small_input=True, **options),
}


def build_model(name: str, num_classes: int, **options) -> nn.Module:
    """`alexnet`, `alexnet-cifar`, or any torchvision classification model by name."""
    if name in MODELS:
        return MODELS[name](num_classes, **options)
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        known = ", ".join([*MODELS, "or a torchvision classification model such as resnet18"])
        raise ValueError(f"unknown model {name!r}: use {known}")
    if options:
        raise ValueError(f"{name} takes no AlexNet options ({', '.join(options)})")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def input_size(model: nn.Module) -> int:
    return getattr(model, "input_size", 224)


def decode_size(crop: int) -> int:
    """The size images are decoded at for a model that takes `crop` x `crop` input: crop 224 means
    decode at 256, whose 224 crops the paper trains on; a small model's input is its decode size."""
    return 256 if crop == 224 else crop
