"""Built-in models for tests and benchmarks: deep chains, pre-activation ResNets, random DAGs and
random nets for fuzzing. Each builder returns ``(model, sample shape, default batch)``; the
specs ``remat:NAME?option=value`` of :mod:`remat.tools.models` call them."""

from __future__ import annotations

import random

import torch
from torch import nn

__all__ = ["PreActBottleneck", "RandomDAG", "RandomNet", "Scale", "chain", "mlp", "preact_resnet", "random_dag", "random_net"]


def mlp(depth: int = 3, width: int = 256, bias: bool = False):
    """``depth`` x (Linear(width, width) + ReLU); default batch 1024."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width, bias=bias), nn.ReLU()]
    return nn.Sequential(*layers), (width,), 1024


class Scale(nn.Module):
    """Multiplies by a constant: a stage that saves nothing for backward."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


def chain(depth: int = 32, width: int = 512, seed: int = 0):
    """A deep ``nn.Sequential`` whose stages differ in output and saved sizes.

    Stages are drawn at random: Linear to a new width (saves its input), ReLU
    and Tanh (save their output), GELU (saves its input), LayerNorm (saves input
    and statistics), Dropout (saves a bool mask) and Scale (saves nothing).
    Default batch 256.
    """
    rng = random.Random(seed)
    widths = [width // 4, width // 2, width, 2 * width]
    kinds = ["linear", "linear", "relu", "gelu", "tanh", "layernorm", "dropout", "scale"]
    stages: list[nn.Module] = []
    current = width
    for _ in range(depth):
        kind = rng.choice(kinds)
        if kind == "linear":
            out = rng.choice(widths)
            stages.append(nn.Linear(current, out))
            current = out
        elif kind == "layernorm":
            stages.append(nn.LayerNorm(current))
        elif kind == "dropout":
            stages.append(nn.Dropout(0.1))
        elif kind == "scale":
            stages.append(Scale(0.5))
        else:
            stages.append({"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}[kind]())
    return nn.Sequential(*stages), (width,), 256


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck (He et al. 2016): BN-ReLU-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        out = self.conv3(torch.relu(self.bn3(out)))
        return out + shortcut


def preact_resnet(depth: int = 164, num_classes: int = 10):
    """CIFAR pre-activation ResNet, ``depth = 9n + 2`` (164, 1001, ...), as a chain of blocks.

    Three stages of ``n`` bottleneck blocks (widths 16, 32, 64; stride 2 at
    the start of the 2nd and 3rd); input 3x32x32, default batch 128.
    """
    if depth < 11 or (depth - 2) % 9:
        raise ValueError(f"preact_resnet depth must be 9n+2 with n >= 1 (11, 164, 1001), not {depth}")
    n = (depth - 2) // 9
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1, bias=False)]
    in_channels = 16
    for stage, width in enumerate((16, 32, 64)):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            layers.append(PreActBottleneck(in_channels, width, stride))
            in_channels = width * PreActBottleneck.expansion
    head = nn.Sequential(
        nn.BatchNorm2d(in_channels),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(in_channels, num_classes),
    )
    layers.append(head)
    return nn.Sequential(*layers), (3, 32, 32), 128


class RandomDAG(nn.Module):
    """A random program over ``(batch, width)`` tensors with branches and joins.

    Each step applies one op to earlier values: ``linear`` (to width or
    2*width), ``relu``/``tanh``, ``add``/``mul`` of two values of one width,
    ``cat`` of two width-``width`` values, or ``split`` of a 2*width value into
    two halves (views). The output concatenates every value no step consumed,
    so every op contributes to the loss.
    """

    def __init__(self, ops: int, width: int, seed: int):
        super().__init__()
        rng = random.Random(seed)
        self.linears = nn.ModuleList()
        widths = [width]  # width of each value; value 0 is the input
        self.program: list[tuple[str, tuple[int, ...]]] = []
        for _ in range(ops):
            op = rng.choice(["linear", "linear", "act", "add", "mul", "cat", "split"])
            a = rng.randrange(max(0, len(widths) - 4), len(widths))  # mostly recent values
            same = [i for i, w in enumerate(widths) if w == widths[a]]
            if op == "linear":
                out = rng.choice([width, 2 * width])
                self.linears.append(nn.Linear(widths[a], out))
                self.program.append(("linear", (a, len(self.linears) - 1)))
                widths.append(out)
            elif op == "act":
                self.program.append((rng.choice(["relu", "tanh"]), (a,)))
                widths.append(widths[a])
            elif op in ("add", "mul"):
                self.program.append((op, (a, rng.choice(same))))
                widths.append(widths[a])
            elif op == "cat" and widths[a] == width:
                self.program.append(("cat", (a, rng.choice(same))))
                widths.append(2 * width)
            elif op == "split" and widths[a] == 2 * width:
                self.program.append(("split", (a,)))
                widths += [width, width]
            else:  # cat/split do not fit this value's width: change the width instead
                out = 2 * width if widths[a] == width else width
                self.linears.append(nn.Linear(widths[a], out))
                self.program.append(("linear", (a, len(self.linears) - 1)))
                widths.append(out)
        used = {i for op, args in self.program for i in (args[:1] if op == "linear" else args)}
        self.outputs = [i for i in range(1, len(widths)) if i not in used] or [len(widths) - 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = [x]
        for op, args in self.program:
            if op == "linear":
                values.append(self.linears[args[1]](values[args[0]]))
            elif op == "relu":
                values.append(torch.relu(values[args[0]]))
            elif op == "tanh":
                values.append(torch.tanh(values[args[0]]))
            elif op == "add":
                values.append(values[args[0]] + values[args[1]])
            elif op == "mul":
                values.append(values[args[0]] * values[args[1]])
            elif op == "cat":
                values.append(torch.cat([values[args[0]], values[args[1]]], dim=-1))
            else:  # split
                values += list(values[args[0]].chunk(2, dim=-1))
        return torch.cat([values[i] for i in self.outputs], dim=-1)


def random_dag(ops: int = 20, width: int = 64, seed: int = 0):
    """See :class:`RandomDAG`; input ``(batch, width)``, default batch 64."""
    return RandomDAG(ops, width, seed), (width,), 64


class RandomNet(nn.Module):
    """A random network of common layers, for fuzzing exact gradients.

    The structure is fixed by ``seed`` at construction (``torch.fx`` traces
    it: no data-dependent control flow). Every value is a ``(batch, w)``
    tensor with ``w`` either ``width`` or ``2 * width``; each step reads
    earlier values (mostly recent ones, so the graph has cuts) and adds one
    value (two for a split):

    * layers: ``linear`` (to either width), ``conv1d`` / ``conv2d`` (a 3-wide /
      3x3 convolution on a ``(batch, channels, length)`` / ``(batch, channels,
      2, 2)`` view), ``batchnorm``, ``layernorm``, ``dropout`` (module or
      functional);
    * elementwise: ``relu`` / ``gelu`` / ``tanh`` (functions and modules),
      ``add`` and ``mul`` of two values;
    * shape: ``cat`` of two ``width`` values, ``split`` of a ``2 * width``
      value into two views (``chunk`` or ``torch.split``), ``transpose`` (a
      ``view``, ``transpose`` and ``reshape`` that permutes the features);
    * ``inplace``: a fresh sum or scaled copy of values, then changed in place
      (``relu_``, ``add_``, ``mul_`` or an in-place ``ReLU`` module) -- never a
      tensor anything else reads, nor the model's input.

    The values no step reads are the outputs: a tuple when there are several.

    Args:
        ops: number of steps (keep it small: <= 20).
        width: feature width, a multiple of 8.
        seed: picks the structure; the weights come from the global RNG.

    Example:
        >>> import torch
        >>> from remat.tools.nets import RandomNet
        >>> net = RandomNet(ops=12, width=8, seed=3)
        >>> outputs = net(torch.randn(4, 8))
        >>> torch.fx.symbolic_trace(net) is not None
        True
    """

    KINDS = (
        "linear", "linear", "conv1d", "conv2d", "batchnorm", "layernorm", "dropout",
        "act", "act", "add", "mul", "cat", "split", "transpose", "inplace", "inplace",
    )

    def __init__(self, ops: int = 12, width: int = 16, seed: int = 0):
        super().__init__()
        if width % 8 or width < 8:
            raise ValueError(f"RandomNet width must be a positive multiple of 8, not {width}")
        rng = random.Random(seed)
        self.width = width
        self.layers = nn.ModuleList()
        widths = [width]  # width of each value; value 0 is the input
        # (kind, variant, value indices read, layer index or -1)
        self.program: list[tuple[str, str, tuple[int, ...], int]] = []

        def recent() -> int:
            """Mostly the newest value, else one of the three before it."""
            newest = len(widths) - 1
            return newest if rng.random() < 0.5 else rng.randrange(max(0, newest - 3), newest + 1)

        def partner(a: int) -> int:
            """Another value of ``a``'s width, preferably a recent one."""
            same = [i for i, w in enumerate(widths) if w == widths[a]]
            return rng.choice([i for i in same if i >= len(widths) - 4] or same)

        def step(kind: str, variant: str, args: tuple[int, ...], out: int, layer: nn.Module | None = None):
            index = -1
            if layer is not None:
                self.layers.append(layer)
                index = len(self.layers) - 1
            self.program.append((kind, variant, args, index))
            widths.extend([out] if kind != "split" else [out, out])

        for number in range(ops):
            # The first step has parameters, so every model has something to train.
            kind = rng.choice(self.KINDS if number else self.KINDS[:5])
            a = recent()
            w = widths[a]
            if kind == "cat" and w != width:
                kind = "split"
            elif kind == "split" and w != 2 * width:
                kind = "cat"
            if kind == "linear":
                out = rng.choice([width, 2 * width])
                step(kind, "", (a,), out, nn.Linear(w, out, bias=rng.random() < 0.7))
            elif kind == "conv1d":
                step(kind, "", (a,), w, nn.Conv1d(4, 4, 3, padding=1))
            elif kind == "conv2d":
                step(kind, "", (a,), w, nn.Conv2d(w // 4, w // 4, 3, padding=1, bias=False))
            elif kind == "batchnorm":
                step(kind, "", (a,), w, nn.BatchNorm1d(w))
            elif kind == "layernorm":
                step(kind, "", (a,), w, nn.LayerNorm(w))
            elif kind == "dropout":
                variant = rng.choice(["module", "function"])
                step(kind, variant, (a,), w, nn.Dropout(0.25) if variant == "module" else None)
            elif kind == "act":
                variant = rng.choice(["relu", "gelu", "tanh", "ReLU", "GELU", "Tanh"])
                module = getattr(nn, variant)() if variant[0].isupper() else None
                step(kind, variant, (a,), w, module)
            elif kind in ("add", "mul"):
                step(kind, "", (a, partner(a)), w)
            elif kind == "cat":
                step(kind, "", (a, partner(a)), 2 * width)
            elif kind == "split":
                step(kind, rng.choice(["chunk", "split"]), (a,), width)
            elif kind == "transpose":
                step(kind, str(rng.choice([2, 4])), (a,), w)
            else:  # inplace
                variant = rng.choice(["relu_", "add_", "mul_", "ReLU"])
                step(kind, variant, (a, partner(a)), w, nn.ReLU(inplace=True) if variant == "ReLU" else None)
        self.widths = widths  # Python ints, so the traced graph computes no shapes
        read = {i for _, _, args, _ in self.program for i in args}
        learned = [False]  # whether each value depends on a parameter
        for kind, _, args, index in self.program:
            weighted = index >= 0 and len(list(self.layers[index].parameters())) > 0
            learned += [weighted or any(learned[i] for i in args)] * (
                2 if kind == "split" else 1
            )
        # Outputs that depend on parameters first: the default loss reads the first.
        self.outputs = sorted(
            (i for i in range(1, len(widths)) if i not in read), key=lambda i: (not learned[i], i)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        values = [x]
        for kind, variant, args, index in self.program:
            layer = self.layers[index] if index >= 0 else None
            a, w = values[args[0]], self.widths[args[0]]
            if kind == "linear" or kind == "batchnorm" or kind == "layernorm":
                values.append(layer(a))
            elif kind == "conv1d":
                values.append(layer(a.view(-1, 4, w // 4)).flatten(1))
            elif kind == "conv2d":
                values.append(layer(a.reshape(-1, w // 4, 2, 2)).reshape(-1, w))
            elif kind == "dropout":
                values.append(layer(a) if layer is not None else nn.functional.dropout(a, 0.25, self.training))
            elif kind == "act":
                values.append(layer(a) if layer is not None else getattr(torch, variant)(a)
                              if variant != "gelu" else nn.functional.gelu(a))
            elif kind == "add":
                values.append(a + values[args[1]])
            elif kind == "mul":
                values.append(a * values[args[1]])
            elif kind == "cat":
                values.append(torch.cat([a, values[args[1]]], dim=1))
            elif kind == "split":
                halves = a.chunk(2, dim=1) if variant == "chunk" else torch.split(a, self.width, dim=1)
                values += [halves[0], halves[1]]  # indexed: a traced result cannot be unpacked
            elif kind == "transpose":
                rows = int(variant)
                values.append(a.view(-1, rows, w // rows).transpose(1, 2).reshape(-1, w))
            else:  # inplace, on a fresh tensor that nothing else reads
                fresh = a + values[args[1]] if variant in ("relu_", "ReLU") else a * 0.5
                if variant == "relu_":
                    fresh.relu_()
                elif variant == "add_":
                    fresh.add_(values[args[1]])
                elif variant == "mul_":
                    fresh.mul_(values[args[1]])
                else:
                    fresh = layer(fresh)
                values.append(fresh)
        outputs = tuple(values[i] for i in self.outputs)
        return outputs if len(outputs) > 1 else outputs[0]


def random_net(ops: int = 12, width: int = 16, seed: int = 0):
    """See :class:`RandomNet`; input ``(batch, width)``, default batch 4."""
    return RandomNet(ops, width, seed), (width,), 4
