"""What every benchmark script shares: machine info, round-robin timing, the command line and
the JSON results.

The scripts run as ``python benchmarks/bench_X.py``, which puts this folder on ``sys.path``, so
they import it as ``from _harness import ...``. Every script takes ``--quick`` (small settings,
a smoke run: about a minute for most, 9 for bench_seam, longer for bench_pyro) and writes its
JSON through :func:`write_results`: published
figures to ``benchmarks/results/{name}.json``, quick runs to ``benchmarks/results/quick/``
(ignored by git), so a smoke run never overwrites a published result.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
QUICK_HELP = ("small settings, a smoke run (minutes, not hours, on 2 cores); results go to "
              "benchmarks/results/quick/, never over the published JSON")


def machine() -> dict:
    """The machine a result was taken on.

    Returns:
        ``{"platform", "python", "torch", "threads", "cores", "date"}``: torch's intra-op
        threads at the time of the call, ``os.cpu_count()``, and today's date (ISO).
    """
    import torch  # here, so that importing the harness stays light (bench_scale's parent)

    return {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cores": os.cpu_count(), "date": datetime.date.today().isoformat()}


def wall_times(fns: list[Callable[[], object]], repeats: int) -> list[list[float]]:
    """Wall times of ``repeats`` calls of each of ``fns``, timed round-robin.

    One call of each function per round, so that a burst of load on a shared machine hits
    every function alike.

    Args:
        fns: functions of no argument; their results are discarded.
        repeats: rounds.

    Returns:
        For each function, its ``repeats`` wall times in seconds, in call order.
    """
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            tic = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - tic)
    return times


def median_times(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median wall time of each of ``fns``, timed round-robin (see :func:`wall_times`).

    Args:
        fns: functions of no argument.
        repeats: rounds (calls of each function).

    Returns:
        The median wall time of each function, in seconds.
    """
    return [statistics.median(ts) for ts in wall_times(fns, repeats)]


def parser(description: str) -> argparse.ArgumentParser:
    """The command line every script shares: ``--quick``; each script adds its own options.

    Args:
        description: what the script measures (its docstring's first line).
    """
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help=QUICK_HELP)
    return p


def results_dir(quick: bool) -> Path:
    """``benchmarks/results/``, or ``benchmarks/results/quick/`` for a quick run (created)."""
    folder = RESULTS / "quick" if quick else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_results(name: str, payload: dict, quick: bool) -> Path:
    """Write a script's results as ``{name}.json`` in :func:`results_dir` and say where.

    Args:
        name: the file's stem, e.g. ``"logprob"``.
        payload: the results; ``"machine": machine()`` is put first unless present.
        quick: a ``--quick`` run: write under ``results/quick/``.

    Returns:
        The path written.
    """
    if "machine" not in payload:
        payload = {"machine": machine(), **payload}
    path = results_dir(quick) / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    print(f"wrote {path}")
    return path
