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
  GPT-2, 512 for BERT), batch to 8. Their attention is eager (plain matmuls).
* ``hf:TYPE`` for any other ``transformers`` model type (``llama``, ``mistral``,
  ``qwen2``, ``gemma``, ``t5``, ``bart``, ``vit``, ...): the config of
  ``AutoConfig.for_model(TYPE, **options)`` and the auto model class of
  ``task`` (``causal-lm``, ``seq2seq-lm``, ``masked-lm``,
  ``image-classification`` or ``base``; by default the first of these the
  type has), attention as transformers picks it (``attn=eager`` or
  ``attn=sdpa`` to choose). The inputs are a batch of keyword arguments with
  labels (``model(**batch)`` gives the loss): token ids of length ``seq``
  (default 128) or images of the config's size; batch 8. The config's
  defaults are often billions of parameters: give sizes (``hidden_size``,
  ``num_hidden_layers``, ...); built with weights, a model of over 2 billion
  is refused (build it with ``fake=True``: no weights, any size).
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
``batch_size`` argument wins), and ``dtype=NAME`` (``bfloat16``, ``float16``):
the parameters and floating-point inputs in that dtype. Option values are read as int, float or bool
(``true``/``false``) where they look like one, else kept as strings.

Models are built on CPU with real random weights, seeded so that the same spec
always gives the same model, and returned in training mode; with ``fake=True``
they are built without weights (fake tensors), for planning.

Example:
    >>> from remat.tools import models
    >>> src = models.load("remat:mlp?depth=2&width=64", batch_size=4)
    >>> src.name, [tuple(x.shape) for x in src.example_inputs]
    ('remat:mlp?depth=2&width=64', [(4, 64)])
    >>> [tuple(x.shape) for x in src.make_inputs(16)]
    [(16, 64)]
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

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
        example_inputs: positional inputs at the default (or requested) batch size, or
            (``hf:TYPE``) a batch of keyword arguments.
        make_inputs: ``batch_size -> inputs`` of the same kind at another batch size,
            so batch sizes can be compared without rebuilding the model.
    """

    name: str
    model: nn.Module
    example_inputs: tuple[torch.Tensor, ...] | dict[str, Any]
    make_inputs: Callable[[int], tuple[torch.Tensor, ...] | dict[str, Any]] = dataclasses.field(repr=False)

    @property
    def tensors(self) -> list[torch.Tensor]:
        """The tensors of ``example_inputs`` (positional, or the values of a batch), in order."""
        values = self.example_inputs.values() if isinstance(self.example_inputs, dict) else self.example_inputs
        return [t for t in values if isinstance(t, torch.Tensor)]

    def to(self, device: torch.device) -> None:
        """Move the model and the example inputs to ``device``."""
        self.model.to(device)
        move = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
        if isinstance(self.example_inputs, dict):
            self.example_inputs = {k: move(v) for k, v in self.example_inputs.items()}
        else:
            self.example_inputs = tuple(map(move, self.example_inputs))


def load(
    spec: str, batch_size: int | None = None, *, input_shape: tuple[int, ...] | None = None, fake: bool = False
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
        fake: build the model without weights, for planning and fake-tensor
            steps only: on the meta device, its parameters and buffers then
            made fake CPU tensors (no memory, no data; no initialisation run),
            so a model of any size builds in seconds. The example inputs stay real.

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
    dtype = _dtype(options.pop("dtype", None), spec)
    with torch.random.fork_rng(devices=[]), torch.device("meta") if fake else contextlib.nullcontext():
        torch.manual_seed(SEED)
        model, make_inputs, source_batch = _build(spec, target, options, input_shape, fake)
        if dtype is not None:
            model.to(dtype)
            make_inputs = _cast_inputs(make_inputs, dtype)
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device="cpu")
    batch = batch_size or default_batch or source_batch
    return ModelSource(spec, model.train(), make_inputs(batch), make_inputs)


def _dtype(name: Any, spec: str) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={name!r} in {spec!r} is not a floating-point torch dtype (float32, bfloat16, float16)")
    return dtype


def _cast_inputs(make_inputs: Callable[[int], Any], dtype: torch.dtype) -> Callable[[int], Any]:
    """``make_inputs`` with its floating-point tensors in ``dtype`` (token ids stay integers)."""

    def make(batch_size: int) -> Any:
        cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
        return tree_map_only(torch.Tensor, cast, make_inputs(batch_size))

    return make


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


def _build(spec: str, target: str, options: dict[str, Any], input_shape, fake: bool = False):
    scheme, sep, name = target.rpartition(":")
    if not sep:
        raise ValueError(f"model spec {spec!r} has no scheme; use one of: {SPEC_FORMS}")
    if scheme == "torchvision":
        return _torchvision(name, options, input_shape)
    if scheme == "hf":
        return _huggingface(name, options, input_shape, fake)
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


def _huggingface(name: str, options: dict[str, Any], input_shape, fake: bool):
    if name not in _HF_MODELS:
        return _hf_auto(name, options, input_shape, fake)
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


# task -> (the auto model class, the name of its model-type table in transformers' auto module)
_HF_TASKS = {
    "causal-lm": ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    "seq2seq-lm": ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    "masked-lm": ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    "image-classification": ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    "base": ("AutoModel", "MODEL_MAPPING_NAMES"),
}
_HF_MAX_PARAMETERS = 2_000_000_000  # real weights on the CPU: larger models would not fit


def _hf_auto(model_type: str, options: dict[str, Any], input_shape, fake: bool):
    """Any transformers model type, from ``AutoConfig.for_model`` and the auto class of a task."""
    import transformers
    from transformers.models.auto import modeling_auto

    try:
        config = transformers.AutoConfig.for_model(model_type)
    except ValueError:
        raise ValueError(
            f"no Hugging Face model type {model_type!r}: use hf:gpt2, hf:bert or a transformers model type "
            "(hf:llama, hf:t5, hf:vit, ...)"
        ) from None
    seq = options.pop("seq", 128)
    attn = options.pop("attn", None)
    tasks = [t for t, (_, table) in _HF_TASKS.items() if model_type in getattr(modeling_auto, table)]
    task = options.pop("task", tasks[0] if tasks else None)
    if task not in tasks:
        raise ValueError(f"hf:{model_type} has no task {task!r}; it has: {', '.join(tasks) or 'none'}")
    fields = inspect.signature(type(config).__init__).parameters
    # Token ids (decoder_start_token_id, pad_token_id) are fields of every config, set or not.
    unknown = sorted(k for k in options if not (hasattr(config, k) or k in fields or k.endswith("_token_id")))
    if unknown:
        raise ValueError(
            f"{type(config).__name__} has no field {', '.join(map(repr, unknown))}; the options of hf:{model_type} "
            "are batch, seq, task, attn and the fields of its config"
        )
    config = transformers.AutoConfig.for_model(model_type, **options)
    if attn is not None:
        config._attn_implementation = attn
    auto = getattr(transformers, _HF_TASKS[task][0])
    if not fake:
        with torch.device("meta"):
            size = sum(p.numel() for p in auto.from_config(config).parameters())
        if size > _HF_MAX_PARAMETERS:
            raise ValueError(
                f"hf:{model_type} with these options has {size / 1e9:.1f} billion parameters, too many to build "
                "with weights on this machine: plan it without weights (remat plan --fake, models.load(..., "
                "fake=True)) or give smaller sizes (e.g. hidden_size=256&num_hidden_layers=4)"
            )
    model = auto.from_config(config)
    if input_shape is not None:
        seq = input_shape[0]
    takes = inspect.signature(model.forward).parameters

    def make_inputs(batch_size: int) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(SEED)
        if task == "image-classification":
            size, channels = config.image_size, getattr(config, "num_channels", 3)
            return {
                "pixel_values": torch.randn(batch_size, channels, size, size, generator=generator),
                "labels": torch.randint(config.num_labels, (batch_size,), generator=generator),
            }
        ids = torch.randint(config.vocab_size, (batch_size, seq), generator=generator)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if task != "base":
            batch["labels"] = ids
        if "use_cache" in takes:
            batch["use_cache"] = False  # training keeps no key/value cache
        return batch

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
