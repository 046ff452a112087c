"""Models to measure and optimize, named by one spec string.

The same spec is used by the Python API, the benchmarks and the command line:

* ``torchvision:NAME`` -- any torchvision classification model (``resnet50``,
  ``densenet121``, ``vit_b_16``, ...). Input ``3x224x224`` (``3x299x299`` for
  ``inception_v3``), batch 32. Options are constructor arguments, e.g.
  ``torchvision:resnet18?num_classes=10``.
* ``hf:NAME`` -- a Hugging Face ``transformers`` model built from its config
  class with random weights (nothing is downloaded): ``hf:gpt2``
  (``GPT2LMHeadModel``) or ``hf:bert`` (``BertModel``). Options override the
  config, and ``seq`` sets the sequence length, e.g.
  ``hf:gpt2?n_layer=4&n_embd=256&seq=128``. Input: token ids of shape
  ``(batch, seq)``; ``seq`` defaults to the longest the model takes (1024 for
  GPT-2, 512 for BERT), batch to 8.
* ``path/to/file.py:factory`` -- imports the file and calls
  ``factory(**options)``, which returns a module or a ``(module,
  example_inputs)`` tuple. A bare module needs ``input_shape``.
* ``remat:NAME`` -- built-in generators: ``chain`` (a heterogeneous deep
  ``nn.Sequential``), ``preact_resnet`` (pre-activation bottleneck ResNet of
  any depth, as a chain of blocks), ``random_dag`` (a random graph of small
  tensor ops), ``random_net`` (a tiny random graph of common layers, views,
  in-place ops and several outputs, for fuzzing) and ``mlp`` (a plain MLP for
  golden tests).

Every spec also takes ``batch=N``, the default batch size (an explicit
``batch_size`` argument wins). Option values are read as int, float or bool
(``true``/``false``) where they look like one, else kept as strings.

Models are built on CPU with real random weights, seeded so that the same spec
always gives the same model, and returned in training mode.

Example:
    >>> from remat.tools import models
    >>> src = models.load("remat:mlp?depth=2&width=64", batch_size=4)
    >>> src.name, [tuple(x.shape) for x in src.example_inputs]
    ('remat:mlp?depth=2&width=64', [(4, 64)])
    >>> [tuple(x.shape) for x in src.make_inputs(16)]
    [(16, 64)]
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["ModelSource", "PreActBottleneck", "RandomDAG", "RandomNet", "Scale", "load"]

SPEC_FORMS = (
    "torchvision:NAME, hf:gpt2, hf:bert, remat:chain, remat:preact_resnet, "
    "remat:random_dag, remat:random_net, remat:mlp or path/to/file.py:factory, each optionally "
    "followed by ?key=value&key=value"
)
SEED = 0


@dataclasses.dataclass
class ModelSource:
    """A model with inputs for one training step.

    Attributes:
        name: the spec the model was loaded from.
        model: the module, on CPU, in training mode.
        example_inputs: positional inputs at the default (or requested) batch size.
        make_inputs: ``batch_size -> inputs`` of the same kind at another batch size,
            so batch sizes can be compared without rebuilding the model.
    """

    name: str
    model: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    make_inputs: Callable[[int], tuple[torch.Tensor, ...]] = dataclasses.field(repr=False)


def load(
    spec: str, batch_size: int | None = None, *, input_shape: tuple[int, ...] | None = None
) -> ModelSource:
    """Build the model named by ``spec`` with example inputs.

    Args:
        spec: see the module documentation, e.g. ``"torchvision:resnet50"``,
            ``"hf:gpt2?n_layer=2&seq=128"``, ``"remat:preact_resnet?depth=1001"``
            or ``"my_models.py:build"``.
        batch_size: batch of ``example_inputs``; default: the spec's ``batch``
            option, else the source's default.
        input_shape: shape of one sample, without the batch dimension, e.g.
            ``(3, 64, 64)`` for an image model or ``(128,)`` (sequence length)
            for a Hugging Face model. Required for a file factory that returns
            only a module.

    Raises:
        ValueError: the spec, its name or one of its options is not understood.

    Example:
        >>> from remat.tools import models
        >>> src = models.load("torchvision:resnet18", 2, input_shape=(3, 64, 64))
        >>> tuple(src.example_inputs[0].shape)
        (2, 3, 64, 64)
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, not {batch_size}")
    target, options = _split_options(spec)
    default_batch = options.pop("batch", None)
    if default_batch is not None and not (isinstance(default_batch, int) and default_batch > 0):
        raise ValueError(f"batch={default_batch!r} in {spec!r} must be a positive integer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model, make_inputs, source_batch = _build(spec, target, options, input_shape)
    batch = batch_size or default_batch or source_batch
    return ModelSource(spec, model.train(), make_inputs(batch), make_inputs)


# -- spec parsing ----------------------------------------------------------------


def _split_options(spec: str) -> tuple[str, dict[str, Any]]:
    target, _, query = spec.partition("?")
    options: dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(
                f"option {item!r} in {spec!r} is not key=value; write options as "
                "NAME?key=value&key=value"
            )
        options[key] = _parse_value(value)
    return target, options


def _parse_value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _build(spec: str, target: str, options: dict[str, Any], input_shape):
    scheme, sep, name = target.rpartition(":")
    if not sep:
        raise ValueError(f"model spec {spec!r} has no scheme; use one of: {SPEC_FORMS}")
    if scheme == "torchvision":
        return _torchvision(name, options, input_shape)
    if scheme == "hf":
        return _huggingface(name, options, input_shape)
    if scheme == "remat":
        return _generator(name, options, input_shape)
    if scheme.endswith(".py"):
        return _from_file(Path(scheme), name, options, input_shape)
    raise ValueError(f"unknown model source {scheme!r} in {spec!r}; use one of: {SPEC_FORMS}")


def _float_inputs(shape: tuple[int, ...]) -> Callable[[int], tuple[torch.Tensor, ...]]:
    """Standard-normal inputs of per-sample ``shape``, the same values on every call."""

    def make(batch_size: int) -> tuple[torch.Tensor, ...]:
        generator = torch.Generator().manual_seed(SEED)
        return (torch.randn(batch_size, *shape, generator=generator),)

    return make


# -- torchvision -----------------------------------------------------------------

# Constructor arguments that keep a model's output a single tensor and its
# initialization fast (the old scipy-based init takes minutes).
_TORCHVISION_DEFAULTS = {
    "inception_v3": {"aux_logits": False, "init_weights": True},
    "googlenet": {"aux_logits": False, "init_weights": True},
}


def _torchvision(name: str, options: dict[str, Any], input_shape):
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ValueError(
            f"torchvision has no classification model {name!r}; pick one of: "
            + ", ".join(available)
        )
    kwargs = {**_TORCHVISION_DEFAULTS.get(name, {}), **options}
    try:
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    except TypeError as error:
        raise ValueError(f"bad option for torchvision:{name}: {error}") from None
    side = 299 if name == "inception_v3" else 224
    return model, _float_inputs(input_shape or (3, side, side)), 32


# -- Hugging Face ----------------------------------------------------------------

# name -> (config class, model class, config field holding the longest sequence)
_HF_MODELS = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", "n_positions"),
    "bert": ("BertConfig", "BertModel", "max_position_embeddings"),
}


def _huggingface(name: str, options: dict[str, Any], input_shape):
    if name not in _HF_MODELS:
        raise ValueError(
            f"no Hugging Face model {name!r}; use one of: "
            + ", ".join(f"hf:{n}" for n in _HF_MODELS)
        )
    import transformers

    config_name, model_name, max_seq_field = _HF_MODELS[name]
    config = getattr(transformers, config_name)()
    # Training: no key/value cache (its cache object is also not a plain tensor output).
    config.use_cache = False
    seq = options.pop("seq", None)
    for key, value in options.items():
        if not hasattr(config, key):
            raise ValueError(
                f"{config_name} has no field {key!r}; the options of hf:{name} are batch, "
                f"seq and the fields of transformers.{config_name}"
            )
        setattr(config, key, value)
    # Eager attention computes the attention matrix with plain matmul/softmax,
    # the same operators on real and fake tensors, so fake-tensor measurements
    # equal real ones to the byte.
    config._attn_implementation = "eager"
    if input_shape is not None:
        if len(input_shape) != 1:
            raise ValueError(
                f"hf:{name} takes token ids; input_shape is (sequence length,), not {input_shape}"
            )
        seq = input_shape[0]
    seq = seq or getattr(config, max_seq_field)
    model = getattr(transformers, model_name)(config)

    def make_inputs(batch_size: int) -> tuple[torch.Tensor, ...]:
        generator = torch.Generator().manual_seed(SEED)
        return (torch.randint(config.vocab_size, (batch_size, seq), generator=generator),)

    return model, make_inputs, 8


# -- file factories --------------------------------------------------------------


def _from_file(path: Path, factory_name: str, options: dict[str, Any], input_shape):
    if not path.is_file():
        raise ValueError(f"model file {str(path)!r} does not exist; give path/to/file.py:factory")
    module_name = f"_remat_user_model_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ValueError(f"{path} has no function {factory_name!r} to build the model")
    built = factory(**options)
    if isinstance(built, nn.Module):
        if input_shape is None:
            raise ValueError(
                f"{path}:{factory_name} returned only a module; pass input_shape=(...) "
                "(one sample, without the batch) or return (module, example_inputs)"
            )
        return built, _float_inputs(tuple(input_shape)), 32
    if (
        isinstance(built, tuple)
        and len(built) == 2
        and isinstance(built[0], nn.Module)
    ):
        model, examples = built
        examples = examples if isinstance(examples, (tuple, list)) else (examples,)
        return model, _resample(tuple(examples)), _batch_of(examples)
    raise ValueError(
        f"{path}:{factory_name} returned {type(built).__name__}; "
        "it must return an nn.Module or a (module, example_inputs) tuple"
    )


def _batch_of(examples: tuple) -> int:
    for x in examples:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return x.shape[0]
    raise ValueError("example_inputs have no tensor with a batch dimension")


def _resample(examples: tuple) -> Callable[[int], tuple]:
    """Inputs at any batch size made by cycling through the example samples."""

    def make(batch_size: int) -> tuple:
        return tuple(
            x[torch.arange(batch_size) % x.shape[0]]
            if isinstance(x, torch.Tensor) and x.dim() > 0
            else x
            for x in examples
        )

    return make


# -- built-in generators ---------------------------------------------------------


def _generator(name: str, options: dict[str, Any], input_shape):
    builders = {
        "chain": _chain,
        "preact_resnet": _preact_resnet,
        "random_dag": _random_dag,
        "random_net": _random_net,
        "mlp": _mlp,
    }
    if name not in builders:
        raise ValueError(
            f"no built-in model {name!r}; use one of: " + ", ".join(f"remat:{n}" for n in builders)
        )
    accepted = inspect.signature(builders[name]).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"remat:{name} has no option {', '.join(unknown)}; its options are "
            + ", ".join(["batch", *accepted])
        )
    model, sample_shape, batch = builders[name](**options)
    return model, _float_inputs(input_shape or sample_shape), batch


def _mlp(depth: int = 3, width: int = 256, bias: bool = False):
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


def _chain(depth: int = 32, width: int = 512, seed: int = 0):
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


def _preact_resnet(depth: int = 164, num_classes: int = 10):
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


def _random_dag(ops: int = 20, width: int = 64, seed: int = 0):
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
        >>> from remat.tools.models import RandomNet
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


def _random_net(ops: int = 12, width: int = 16, seed: int = 0):
    """See :class:`RandomNet`; input ``(batch, width)``, default batch 4."""
    return RandomNet(ops, width, seed), (width,), 4
