"""Checks on a model and its inputs before anything is traced: errors that say what to do."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from remat.measure.step import model_device

__all__ = ["check_choice", "check_model_and_inputs", "offload_possible"]


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Refuse a string option outside ``choices``, naming them."""
    if value not in choices:
        raise ValueError(f"{name} must be {' or '.join(map(repr, choices))}, got {value!r}")


def check_model_and_inputs(model: nn.Module, inputs: tuple) -> None:
    """Refuse, before tracing, a model and inputs that cannot make a training step to plan.

    Raises ValueError, with what to do, when the model is in eval mode (the
    captured graph would keep eval behaviour), when an input tensor is on a
    device the model's parameters and buffers are not on, when floating-point
    inputs have none of the floating dtypes of the parameters (outside
    autocast), or when neither a parameter nor an input requires grad (there
    is no backward pass).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"remat plans an nn.Module, got {type(model).__name__}")
    name = type(model).__name__
    if not model.training:
        raise ValueError(
            f"{name} is in eval mode: call model.train() first: remat plans training steps "
            "(dropout and BatchNorm are captured in training mode; the optimized module still "
            "runs the model's own forward after .eval() or under torch.no_grad())"
        )
    tensors = [*model.parameters(), *model.buffers()]
    model_devices = {t.device for t in tensors}
    input_tensors = [t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)]
    for t in input_tensors:
        if model_devices and t.device not in model_devices and not (t.dim() == 0 and t.device.type == "cpu"):
            where = ", ".join(sorted(map(str, model_devices)))
            raise ValueError(
                f"the example inputs are on {t.device} but {name}'s parameters and buffers are on "
                f"{where}: move the inputs to {where} (or the model to {t.device}) before planning"
            )
    _check_float_dtypes(name, model, input_tensors)
    if not any(p.requires_grad for p in model.parameters()) and not any(
        t.requires_grad for t in input_tensors
    ):
        raise ValueError(
            f"no parameter of {name} requires grad and no example input requires grad, so there "
            "is no backward pass to plan: unfreeze some parameters (requires_grad_(True)) or pass "
            "an input that requires grad"
        )


def _check_float_dtypes(name: str, model: nn.Module, inputs: list[torch.Tensor]) -> None:
    """Floating inputs of a dtype no parameter has (float64 into a float32 model) fail deep
    inside tracing; say so first. Under autocast the operators cast, so anything goes."""
    floats = {t.dtype for t in inputs if t.is_floating_point()}
    params = {p.dtype for p in model.parameters() if p.is_floating_point()}
    devices = {t.device.type for t in inputs} | {p.device.type for p in model.parameters()}
    if not floats or not params or floats & params:
        return
    if any(torch.is_autocast_enabled(d) for d in devices if torch.amp.is_autocast_available(d)):
        return
    given = ", ".join(sorted(map(str, floats)))
    wanted = ", ".join(sorted(map(str, params)))
    raise ValueError(
        f"the example inputs are {given} but {name}'s parameters are {wanted}: convert the inputs "
        f"(e.g. x.to({sorted(map(str, params))[0]})) or the model (model.to(dtype)) so they match, "
        "or plan inside torch.autocast(...) if the model is meant to run under autocast"
    )


def offload_possible(model: nn.Module, inputs: tuple) -> bool:
    """Whether kept activations can go to host memory: only from a CUDA device (warns otherwise)."""
    device = model_device(model, inputs)
    if device.type == "cuda":
        return True
    warnings.warn(
        f"remat: offload=True does nothing here: the model is on {device}, and kept activations "
        "are offloaded only from a CUDA device to pinned host memory; planning them on the device "
        "instead (move the model and inputs to CUDA to offload)",
        stacklevel=4,
    )
    return False
