"""Language models against their peers: Hugging Face per-layer checkpointing and torch.compile's
min-cut partitioner, at standard sizes, on fake tensors.

For each model, one training step (Hugging Face batch with labels, the model's own loss) under:
``none`` (store everything); ``checkpoint-blocks`` (the model's own
``gradient_checkpointing_enable()``, per layer); ``torch-budget@0.5`` and ``torch-budget@0.2``
(``torch.compile`` with ``activation_memory_budget``, the min-cut partitioner); ``remat`` (the
least peak); and remat at each peer's measured step peak (``remat-flops@<bytes>``: the least
recompute within it). Each row gives the measured step peak, the FLOPs ratio (the step's FLOPs
over storing everything's) and the planning time, and for remat at a peer's peak whether it recomputes no more than the peer.
A strategy that fails is a row that says why.

Run: ``make bench-llm`` (or ``.venv/bin/python benchmarks/llm.py``). Writes
``benchmarks/results/llm.md``; ``--only gpt2,t5`` runs a subset (printed only).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

from machine import pick_models, results_header

from remat import measure_step
from remat.report import format_bytes
from remat.tools import models
from remat.measure.step import positional
from remat.tools.strategies import compare, strategy

# (short name, spec, batch)
MODELS = [
    ("gpt2", "hf:gpt2?n_layer=12&seq=1024", 8),
    ("llama", "hf:llama?hidden_size=1024&intermediate_size=2816&num_hidden_layers=8&num_attention_heads=16"
     "&num_key_value_heads=16&vocab_size=32000&seq=1024", 4),
    ("mistral", "hf:mistral?hidden_size=1024&intermediate_size=3584&num_hidden_layers=8&num_attention_heads=16"
     "&num_key_value_heads=4&vocab_size=32000&seq=1024", 4),
    ("qwen2", "hf:qwen2?hidden_size=896&intermediate_size=4864&num_hidden_layers=8&num_attention_heads=14"
     "&num_key_value_heads=2&vocab_size=32000&seq=1024", 4),
    ("t5-small", "hf:t5?d_model=512&d_ff=2048&num_layers=6&num_heads=8&d_kv=64&vocab_size=32128"
     "&decoder_start_token_id=0&pad_token_id=0&seq=512", 8),
    ("bart-base", "hf:bart?d_model=768&encoder_layers=6&decoder_layers=6&encoder_attention_heads=12"
     "&decoder_attention_heads=12&encoder_ffn_dim=3072&decoder_ffn_dim=3072&vocab_size=50265&seq=512", 8),
    ("bert-base", "hf:bert?seq=512", 8),
]
PEERS = ["checkpoint-blocks", "torch-budget@0.5", "torch-budget@0.2"]
ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "llm.md"


def measure(model, batch, name: str, flops: int):
    """(peak bytes, FLOPs ratio, seconds, recompute FLOPs), or the error's text. The seconds are
    remat's planning (capture and solve), or a peer's whole run (compiles and measured steps)."""
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if name.startswith("remat"):
                module, _ = strategy(name)(model, positional(model, batch), None)
                step = measure_step(module, batch, fake=True)
                recompute = step.forward_flops + step.backward_flops - flops
                return step.peak_bytes, (flops + recompute) / flops, module.plan.capture_seconds + module.plan.solve_seconds, recompute
            (row,) = compare(model, batch, [name], fake=True)
    except Exception as error:  # a peer that cannot run this model is a row, not a stop
        return f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    return row.peak_bytes, (flops + row.recompute_flops) / flops, time.perf_counter() - start, row.recompute_flops


def run_model(name: str, spec: str, batch: int) -> list[str]:
    source = models.load(spec, batch)
    model, inputs = source.model, source.example_inputs
    none = measure_step(model, inputs, fake=True)
    flops = none.forward_flops + none.backward_flops
    rows = []

    def row(strategy: str, result, verdict: str = "") -> None:
        if isinstance(result, str):
            line = f"| {name} (b{batch}) | {strategy} | {result} | | | |"
        else:
            peak, ratio, seconds, _ = result
            line = f"| {name} (b{batch}) | {strategy} | {format_bytes(peak)} | {ratio:.3f} | {seconds:.1f} s | {verdict} |"
        print(line, flush=True)
        rows.append(line)

    row("store everything", (none.peak_bytes, 1.0, 0.0, 0))
    least = measure(model, inputs, "remat", flops)
    peers = {peer: measure(model, inputs, peer, flops) for peer in PEERS}
    lowest = min((r[0] for r in peers.values() if not isinstance(r, str)), default=None)
    verdict = "" if isinstance(least, str) or lowest is None else (
        "at most every peer's" if least[0] <= lowest else f"{least[0] / lowest:.2f}x the lowest peer's"
    )
    row("remat, least peak", least, verdict)
    for peer, result in peers.items():
        row(peer, result)
        if isinstance(result, str):
            continue
        at_peak = measure(model, inputs, f"remat-flops@{result[0]}", flops)
        if isinstance(at_peak, str):
            row(f"remat at {peer}'s peak", at_peak)
        else:
            wins = at_peak[3] <= result[3]
            row(f"remat at {peer}'s peak", at_peak, "recomputes no more" if wins else "recomputes more")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated short names")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    chosen, out = pick_models(parser, args, MODELS, DEFAULT_OUT)
    header = "| model | strategy | step peak | FLOPs ratio | seconds (remat: planning; peers: their run) | verdict |"
    lines = [header, "|---|---|---|---|---|---|"]
    for name, spec, batch in chosen:
        lines += run_model(name, spec, batch)
    if out is not None:
        text = results_header("Language models against their peers", "python benchmarks/llm.py", "bench-llm")
        text += ["", "Specs: " + "; ".join(f"{n}: `{s}`" for n, s, _ in chosen), "", *lines, ""]
        out.write_text("\n".join(text))


if __name__ == "__main__":
    main()
