"""Random heterogeneous chains, for tests and benchmarks."""

from __future__ import annotations

import numpy as np

from remat.chain.model import Chain

__all__ = ["random_chain"]


def random_chain(
    n: int, seed: int = 0, *, carried: bool = False, selective: bool = False, early_stop: bool = False
) -> Chain:
    """A heterogeneous random chain for tests and benchmarks.

    Stages vary in output size by orders of magnitude; some save nothing,
    some only their input or output, some have a large internal temporary.
    With ``carried``, some activations stay live for a few more stages
    (like residual inputs) and some of those are saved by a later stage.
    With ``selective``, stages also have selective costs: run so, a
    stage keeps its input and part of what it saves, and its backward
    first makes the rest again. With ``early_stop``, a recompute stops at its last saved
    tensor: a stage that saves its input only does so before it runs (none of it runs then),
    one with an internal saved tensor saves it halfway, one that saves its output at its end.
    """
    rng = np.random.default_rng(seed)
    act = rng.choice([1, 2, 4, 8, 16, 64], size=n + 1) * 1024 * rng.integers(1, 5, size=n + 1)
    kind = rng.integers(0, 5, size=n)  # 0 nothing, 1 input, 2 output, 3 both, 4 internal
    saves_input = (kind == 1) | (kind == 3) | (kind == 4)
    saves_output = (kind == 2) | (kind == 3)
    saved = np.where(kind == 4, act[1:] * rng.integers(1, 4, size=n), 0)
    temp = np.where(rng.random(n) < 0.2, act[1:] * rng.integers(1, 6, size=n), 0)
    fwd_nosave = act[1:] + temp
    fwd_save = act[1:] + saved + temp
    grad = act.copy()
    grad[0] = 0
    params = rng.integers(0, 3, size=n) * 1024
    bwd = act[:-1] + params + rng.integers(0, 2, size=n) * act[1:]
    flops = act[1:] * rng.integers(1, 100, size=n)
    extra = {}
    if carried:
        bounds = np.arange(n + 1)
        live = np.minimum(bounds + rng.choice([0, 0, 1, 2, 4], size=n + 1), max(n - 1, 0))
        live = np.maximum(live, bounds)
        live[0] = 0
        # a(m) is read by stage live[m] + 1; that stage, or one between, may save it.
        saver = bounds + 2 + (rng.random(n + 1) * np.maximum(live - bounds, 0)).astype(np.int64)
        later = np.where((live >= bounds + 1) & (rng.random(n + 1) < 0.5), np.minimum(saver, live + 1), 0)
        later[later < bounds + 2] = 0
        carried_grad = np.zeros(n + 1, dtype=np.int64)
        for m in range(1, n + 1):
            carried_grad[m + 1 : live[m] + 1] += grad[m]
        # a(m) may be read first by a later stage than m + 1, up to its last reader.
        skips = (live >= bounds + 1) & (rng.random(n + 1) < 0.2)
        first = bounds + 1 + (rng.random(n + 1) * (live - bounds + 1)).astype(np.int64)
        first_reader = np.where(skips, np.minimum(np.maximum(first, bounds + 2), live + 1), bounds + 1)
        extra = dict(live_until=live, later_saver=later, carried_grad_bytes=carried_grad, first_reader=first_reader)
    if selective:
        kept_output = saves_output & (rng.random(n) < 0.5)
        kept = saved // rng.integers(1, 5, size=n)
        remade = saved - kept + np.where(saves_output & ~kept_output, act[1:], 0)
        extra.update(
            selective_fwd_save_peak=act[1:] + kept + temp,
            selective_saved_bytes=kept,
            selective_saves_input=np.ones(n, dtype=bool),
            selective_saves_output=kept_output,
            selective_bwd_peak=bwd + remade,
        )
    if early_stop:
        halfway = kind == 4
        whole = saves_output
        extra.update(
            saves_any=kind != 0,
            last_save_peak=np.where(whole, fwd_save, np.where(halfway, saved + temp // 2, 0)).astype(np.int64),
            last_save_flops=np.where(whole, flops, np.where(halfway, flops // 2, 0)).astype(np.int64),
            last_save_ops=np.zeros(n, dtype=np.int64),
            last_save_written_bytes=np.zeros(n, dtype=np.int64),
            last_save_norm_bytes=np.zeros(n, dtype=np.int64),
        )
    return Chain(**extra,
        act_bytes=act.astype(np.int64),
        grad_bytes=grad.astype(np.int64),
        fwd_nosave_peak=fwd_nosave.astype(np.int64),
        fwd_save_peak=fwd_save.astype(np.int64),
        saved_bytes=saved.astype(np.int64),
        saves_input=saves_input,
        saves_output=saves_output,
        bwd_peak=bwd.astype(np.int64),
        param_grad_bytes=params.astype(np.int64),
        fwd_flops=flops.astype(np.int64),
        bwd_flops=(2 * flops).astype(np.int64),
        base_bytes=int(act[0]),
    )
