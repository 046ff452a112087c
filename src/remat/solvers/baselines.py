"""Plans people write by hand, priced on the chain: store everything, uniform segments, sqrt(n)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from remat.chain.cost import make_solution, single_tensor_boundaries
from remat.chain.model import Chain, ChainSolution

__all__ = ["sqrt_segments", "store_all", "uniform_segments"]


def store_all(chain: Chain) -> ChainSolution:
    """No checkpointing: every stage saves what its backward needs."""
    return make_solution(chain, (), "store_all")


def uniform_segments(chain: Chain, k: int) -> ChainSolution:
    """``k`` segments of (nearly) equal numbers of stages."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, chain.n)
    targets = [round(j * chain.n / k) for j in range(1, k)]
    free = np.array(single_tensor_boundaries(chain))
    if not free.size:
        return make_solution(chain, (), f"uniform_{k}")
    # The nearest boundary where only one activation is live (always a valid plan).
    cps = sorted({int(free[np.abs(free - t).argmin()]) for t in targets} - {0, chain.n})
    return make_solution(chain, cps, f"uniform_{k}")



def sqrt_segments(chain: Chain) -> ChainSolution:
    """Chen et al. (2016): about sqrt(n) segments of equal length."""
    return dataclasses.replace(uniform_segments(chain, max(1, round(math.sqrt(chain.n)))), method="sqrt")
