"""FLOPs of operators: torch.utils.flop_counter's formulas, and CPU attention's."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["flop_formula"]


def _cpu_attention_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


# torch.utils.flop_counter has no formula for the CPU kernel of scaled_dot_product_attention;
# without one, attention would be free on CPU (and fake CPU tensors) but not on CUDA.
_CPU_ATTENTION_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


def flop_formula(func) -> Callable[..., int] | None:
    """The FLOP formula of operator ``func`` (``torch.utils.flop_counter``'s, and CPU attention's);
    None for an operator that counts no FLOPs. Called as ``formula(*args, **kwargs, out_val=out)``.

    Example:
        >>> import torch
        >>> from remat.measure.flops import flop_formula
        >>> flop_formula(torch.ops.aten.mm.default)(torch.ones(2, 3), torch.ones(3, 4), out_val=None)
        48
        >>> flop_formula(torch.ops.aten.relu.default) is None
        True
    """
    packet = func.overloadpacket
    return flop_registry.get(packet) or _CPU_ATTENTION_FORMULAS.get(packet)
