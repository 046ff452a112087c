"""What the benchmarks ran on, for the headers of their result tables."""

from __future__ import annotations

import platform
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
