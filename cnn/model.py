"""The AlexNet family (Krizhevsky, Sutskever and Hinton, 2012) and a registry of models.

`alexnet` is the paper's network for 224x224 input on one device: the paper split conv2,
conv4 and conv5 into two groups, one per GPU, which is why it counts 60 M parameters
where this ungrouped network has 62.4 M at 1000 classes. `alexnet-cifar` keeps the design
(five convolutions, overlapping pooling, normalisation, two dropout FC layers) at the
widths that suit 32x32. Both take any `image_size`: the stem's stride grows with it (the
CIFAR-style 3x3 stride-1 stem at 32 px, the paper's 11x11 stride-4 one from 128 px), and
adaptive pooling before the FC layers gives them the same grid at every size.
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


# conv1's kernel and padding for each stem stride: 3x3 for 32 px, as CIFAR networks have it,
# then about two pixels of kernel per pixel of stride, up to the paper's 11x11 at stride 4.
STEMS = {1: (3, 1), 2: (5, 2), 3: (7, 3), 4: (11, 2)}
MIN_IMAGE_SIZE = 16


def stem_stride(image_size: int) -> int:
    """conv1's stride: what brings the input to about 32 px, at most the paper's 4."""
    return max(1, min(4, round(image_size / 32)))


class AlexNet(nn.Module):
    def __init__(self, num_classes: int = 1000, *, widths=(96, 256, 384, 384, 256), fc: int = 4096,
                 image_size: int = 224, grid: int = 6, pool_padding: int = 0, padding: str = "zeros",
                 pool: str = "max", norm: str = "lrn", dropout: float = 0.5):
        super().__init__()
        _norm(norm, 1)  # validates the option before building anything
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"--image-size must be at least {MIN_IMAGE_SIZE}, not {image_size}")
        w1, w2, w3, w4, w5 = widths
        stride = stem_stride(image_size)
        kernel, stem_padding = STEMS[stride]
        # At stride 1 (CIFAR) conv2 stays 3x3; from stride 2 on it is the paper's 5x5.
        geometry = [(kernel, stride, stem_padding), (3, 1, 1) if stride == 1 else (5, 1, 2)]
        (k1, s1, p1), (k2, s2, p2) = geometry
        self.features = nn.Sequential(
            *_conv_block(3, w1, k1, s1, p1, padding, norm, normalise=True), _pool(pool, pool_padding),
            *_conv_block(w1, w2, k2, s2, p2, padding, norm, normalise=True), _pool(pool, pool_padding),
            *_conv_block(w2, w3, 3, 1, 1, padding, norm, normalise=False),
            *_conv_block(w3, w4, 3, 1, 1, padding, norm, normalise=False),
            *_conv_block(w4, w5, 3, 1, 1, padding, norm, normalise=False), _pool(pool, pool_padding),
        )
        # An identity at the size each network was designed for (6 at 224, 4 at 32).
        self.avgpool = nn.AdaptiveAvgPool2d(grid)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout), nn.Linear(w5 * grid * grid, fc), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(fc, fc), nn.ReLU(inplace=True),
            nn.Linear(fc, num_classes),
        )
        self.input_size = image_size
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
        return self.classifier(self.avgpool(self.features(x)))


MODELS = {
    "alexnet": lambda classes, **options: AlexNet(classes, **options),
    # Pooling padded to halve exactly: 32 -> 16 -> 8 -> 4.
    "alexnet-cifar": lambda classes, **options: AlexNet(
        classes, widths=(64, 192, 384, 256, 256), fc=1024, grid=4, pool_padding=1, **{"image_size": 32, **options}),
}
# The size each AlexNet takes when none is given: the one it was designed for.
NATIVE_SIZES = {"alexnet": 224, "alexnet-cifar": 32}


def build_model(name: str, num_classes: int, **options) -> nn.Module:
    """`alexnet`, `alexnet-cifar`, or any torchvision classification model by name."""
    if name in MODELS:
        return MODELS[name](num_classes, **options)
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        known = ", ".join([*MODELS, "or a torchvision classification model such as resnet18"])
        raise ValueError(f"unknown model {name!r}: use {known}")
    if options:
        raise ValueError(f"{name} takes no AlexNet options ({', '.join(options)}): it is a torchvision "
                         "model, whose input is 224 px")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def has_linear_head(model: nn.Module) -> bool:
    return any(isinstance(module, nn.Linear) for module in model.modules())


def head_name(model: nn.Module) -> str:
    """The classifier's last layer, whose rows are the classes and whose input is what the model
    sees: the last Linear, in AlexNet, ResNet, VGG and ViT alike."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no fully connected classifier layer")
    return linears[-1]


def input_size(model: nn.Module) -> int:
    return getattr(model, "input_size", 224)


def decode_size(crop: int) -> int:
    """The size images are decoded at for a model that takes `crop` x `crop` input: crop 224 means
    decode at 256, whose 224 crops the paper trains on; a small model's input is its decode size."""
    return 256 if crop == 224 else crop
