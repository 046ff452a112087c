"""What the benchmarks ran on, for the headers of their result tables."""

from __future__ import annotations

import argparse
import contextlib
import gc
import platform
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def results_header(title: str, command: str, make_target: str | None = None) -> list[str]:
    """The top of a results file: title, the command that regenerates it, torch, CPU, date."""
    import datetime

    import torch

    return [
        f"# {title}",
        "",
        f"- command: `{command}`" + (f" (`make {make_target}`)" if make_target else ""),
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- CPU: {cpu_name()} ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''})",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
    ]


def pick_models(parser, args, models: list, default_out):
    """The models ``--only`` names (all by default) and where results go: ``--out``, else
    ``default_out`` for a full run, else nowhere (a subset is printed, not written)."""
    chosen = models
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {m[0] for m in models}
        if unknown:
            parser.error(f"unknown model(s) {sorted(unknown)}; pick from {[m[0] for m in models]}")
        chosen = [m for m in models if m[0] in wanted]
    return chosen, args.out or (None if args.only else default_out)


def write_results(lines: list[str], out) -> None:
    """Print a results table and write it to ``out`` (a path), if given."""
    text = "\n".join(lines)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise TimeoutError in this (main) thread after ``seconds``."""

    def expire(signum, frame):
        raise TimeoutError(f"over the {seconds} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def each_model(name: str, spec: str, batch: int, timeout: int, run: Callable[[], list[str]]) -> tuple[list[str], bool]:
    """The result lines ``run()`` makes for one model within ``timeout`` seconds and True, or a
    FAILED section and False (the traceback printed). Compiled graphs and garbage are cleared after."""
    import torch

    start = time.perf_counter()
    print(f"{name} (batch {batch}) ...", flush=True)
    try:
        with time_limit(timeout):
            return run(), True
    except Exception as error:  # reported, and the other models go on
        traceback.print_exc()
        return [f"## {name} ({spec}, batch {batch})", "", f"FAILED: {type(error).__name__}: {error}"[:400], ""], False
    finally:
        torch._dynamo.reset()
        gc.collect()
        print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)


def model_parser(doc: str, default_out: Path, timeout: int) -> argparse.ArgumentParser:
    """The options every per-model benchmark takes: ``--only``, ``--out`` and ``--timeout``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--only", help="comma-separated short names (e.g. resnet50,gpt2)")
    parser.add_argument("--out", type=Path, help=f"results file (default {default_out} for a full run)")
    parser.add_argument("--timeout", type=int, default=timeout, help=f"seconds per model (default {timeout})")
    return parser


def command_line(script: str) -> str:
    """The command that ran this benchmark, for its results header."""
    return f"python benchmarks/{script}" + (" " + " ".join(sys.argv[1:]) if len(sys.argv) > 1 else "")
