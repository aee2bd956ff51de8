"""Issue 5, question 2: the fewest training samples and seconds that reach the calibration bar.

The bar: latent coverage within 0.02 of nominal at all five levels (0.5/0.68/0.9/0.95/0.99) on
5,000 held-out points. For each toy and schedule, train with default settings but a growing
step budget (``--budgets``, x 512 samples per step; the learning-rate schedule is stretched to
each budget) on 20,000 points (seed 1), measure the coverage on unseen points (seed 2), and
report the smallest budget that meets the bar with its samples seen and wall time.

    python benchmarks/bench_training.py [--quick] [--budgets 500 1000 2000 4000]

Writes ``benchmarks/results/training.json``. Single runs on a shared machine: the seconds are
indicative, the samples exact. ``--quick``: budgets 100 and 200 on moons (PR-preserving and
PR-reducing to d = 1), written to ``benchmarks/results/quick/``.
"""

from __future__ import annotations

import os
import time

import torch
from _harness import parser, write_results

from pyro_inflow import InflationaryFlow, datasets, latent_coverage

BAR = 0.02
CASES = [("moons", "prp", None), ("circles", "prp", None), ("sine", "prp", None),
         ("s_curve", "prp", None), ("swiss_roll", "prp", None),
         ("moons", "prr", 1), ("swiss_roll", "prr", 1), ("s_curve", "prr", 2)]
QUICK_CASES = [("moons", "prp", None), ("moons", "prr", 1)]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--budgets", type=int, nargs="+", default=None,
                   help="training steps to try (default 500 1000 2000 4000; 100 200 with "
                        "--quick)")
    a = p.parse_args()
    if a.budgets is None:
        a.budgets = [100, 200] if a.quick else [500, 1000, 2000, 4000]
    rows = []
    for name, schedule, d in QUICK_CASES if a.quick else CASES:
        data = datasets.load(name, n=20_000, seed=1)
        held = datasets.load(name, n=5000, seed=2)
        tries = []
        for steps in a.budgets:
            tic = time.perf_counter()
            flow = InflationaryFlow.fit(data, schedule=schedule, dims_to_keep=d, steps=steps,
                                        progress=False)
            train_s = time.perf_counter() - tic
            with torch.no_grad():
                z = flow.double().encode(held.double())
            err = latent_coverage(z)["max_abs_error"]
            tries.append({"steps": steps, "samples": steps * 512, "train_s": train_s,
                          "max_abs_error": err})
            print(f"  {name} {schedule} d={flow.latent_dim} steps={steps}: "
                  f"{err:.4f} in {train_s:.1f} s", flush=True)
            if err <= BAR:
                break
        met = next((t for t in tries if t["max_abs_error"] <= BAR), None)
        rows.append({"data": name, "schedule": schedule, "d": flow.latent_dim, "tries": tries,
                     "first_meeting_bar": met})
    print(f"\nfewest training samples reaching |coverage - nominal| <= {BAR} at all five levels "
          f"(5,000 unseen points), {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"{'data':>11} {'sched':>5} {'d':>2} {'steps':>6} {'samples':>10} {'train s':>8} "
          f"{'max err':>8}   tried (steps: error)")
    for r in rows:
        m = r["first_meeting_bar"] or {"steps": "-", "samples": "not met", "train_s": float("nan"),
                                       "max_abs_error": float("nan")}
        tried = ", ".join(f"{t['steps']}: {t['max_abs_error']:.3f}" for t in r["tries"])
        samples = f"{m['samples']:,}" if isinstance(m["samples"], int) else m["samples"]
        print(f"{r['data']:>11} {r['schedule']:>5} {r['d']:>2} {m['steps']:>6} {samples:>10} "
              f"{m['train_s']:>8.1f} {m['max_abs_error']:>8.4f}   {tried}")
    write_results("training", {"bar": BAR, "budgets": a.budgets, "rows": rows}, a.quick)


if __name__ == "__main__":
    main()
