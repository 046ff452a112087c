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
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from remat.tools import nets

__all__ = ["ModelSource", "load"]

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
        "chain": nets.chain,
        "preact_resnet": nets.preact_resnet,
        "random_dag": nets.random_dag,
        "random_net": nets.random_net,
        "mlp": nets.mlp,
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
