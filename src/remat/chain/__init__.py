"""The chain model: a model as a linear chain of stages, and the exact peak of a plan on it.

numpy only. Capture and profiling produce a :class:`Chain`; the solvers in
:mod:`remat.solvers` search plans on it; :func:`peak_of` prices any plan,
and :mod:`remat.chain.time` its step time.
"""

from remat.chain.cost import largest_retained, peak_of, recompute_flops_of, segment_stages, single_tensor_boundaries
from remat.chain.model import Chain, ChainSolution, Inner
from remat.chain.random import random_chain
from remat.chain.time import Speed, Work, plan_work, recompute_counts

__all__ = [
    "Chain",
    "ChainSolution",
    "Inner",
    "largest_retained",
    "peak_of",
    "random_chain",
    "recompute_flops_of",
    "segment_stages",
    "single_tensor_boundaries",
    "Speed",
    "Work",
    "plan_work",
    "recompute_counts",
]
