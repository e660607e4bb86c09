"""A ResNet-18-shaped CNN compiled with ``backend="ger"``: inference and a training step.

    python examples/resnet18_cnn.py [--batch 8] [--size 224]

The model is written the way torchvision writes it (``nn.Conv2d`` without bias ->
``nn.BatchNorm2d`` -> ``nn.ReLU(inplace=True)``, basic blocks with a residual add,
1x1 conv + BN downsampling when the shape changes), so Dynamo hands ger the same graph
it would get from ``torchvision.models.resnet18()``. Importable:
``from examples.resnet18_cnn import resnet18``. What ger can do with it: every
conv -> BN [-> ReLU] becomes one folded convolution in eval mode, and the fused
batch-norm ops in training; the ReLU after each residual add is no BN activation
and stays as it is. By default ger times each graph with and without these rewrites at
its first compile and keeps the faster (on a 2-core CPU it often keeps Inductor's form:
the report then lists the rewrites as near-misses with both timings; ``options=
{"autotune": False}`` keeps them). The gradients are compared with eager's relative to
their size: a training step's BN backward through 20 layers amplifies rounding, and
Inductor's own code differs from eager by ~1e-2 of the largest gradient here too
(tests/test_zoo.py checks a residual net's step against a float64 oracle).
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn as nn


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the (downsampled) input, -> ReLU."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    """ResNet-18: 7x7 stem, 4 stages of 2 basic blocks (64, 128, 256, 512 channels)."""

    def __init__(self, num_classes: int = 1000, width: int = 64, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        layers = []
        c_in = width
        for i, c in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(c_in, c, stride), BasicBlock(c, c)))
            c_in = c
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000, width: int = 64) -> ResNet18:
    return ResNet18(num_classes=num_classes, width=width)


def randomize_bn_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial running statistics and affine parameters, as a trained
    model has (fresh ones make eval-mode BN almost the identity, which tests nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = randomize_bn_statistics(resnet18())
    x = torch.randn(args.batch, 3, args.size, args.size)

    import ger_inductor

    eager = copy.deepcopy(model).eval()
    compiled = torch.compile(copy.deepcopy(model).eval(), backend="ger")
    with torch.no_grad():
        ref, out = eager(x), compiled(x)
    print("inference: max |ger - eager| =", float((out - ref).abs().max()))
    print(ger_inductor.last_report())

    eager.train()
    trained = copy.deepcopy(model).train()
    compiled = torch.compile(trained, backend="ger")
    ref, out = eager(x), compiled(x)
    ref.sum().backward()
    out.sum().backward()
    grad_err = max(float((a.grad - b.grad).abs().max() / b.grad.abs().max().clamp_min(1e-12))
                   for a, b in zip(eager.parameters(), trained.parameters()))
    print("training step: max |ger - eager| output", float((out - ref).detach().abs().max()),
          "; parameter gradients, relative to each tensor's largest", f"{grad_err:.1e}")
    print(ger_inductor.last_report())


if __name__ == "__main__":
    main()
