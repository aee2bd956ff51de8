"""Issue-5 figures, question 3: the cost of a log-density, D = 2, 16, 64.

For each D: a flow fitted briefly (200 steps, residual MLP 128x3, so one evaluation costs what
a trained network costs) to samples of a random 3-component Gaussian mixture; then
``log_prob`` of 256 points with the exact trace (``torch.func`` vector-Jacobian products,
vectorized over the D basis vectors) and with the Hutchinson estimate (16 fixed Rademacher
probes), each with the fixed-grid ``warped_rk4`` (12 steps) and adaptive ``dopri5`` at
rtol 1e-5. Median of 3 wall times, NFE, and the Hutchinson error against the exact trace.

    python benchmarks/bench_logprob.py

Prints a table and writes benchmarks/results/logprob.json.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

import pyro_inflow as pif


def samples(D: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(3, D, generator=gen) * 1.5
    A = torch.randn(3, D, D, generator=gen) * 0.4
    k = torch.randint(3, (n,), generator=gen)
    eps = torch.randn(n, D, 1, generator=gen)
    return m[k] + (A[k] @ eps).squeeze(-1)


def main() -> None:
    rows = []
    for D in (2, 16, 64):
        data = samples(D, 20_000, seed=D)
        flow = pif.InflationaryFlow.fit(data, steps=200, progress=False).double()
        x = samples(D, 256, seed=100 + D).double()
        exact = {}
        for solver in ({"method": "warped_rk4", "num_steps": 12, "rtol": 1.0},
                       {"method": "dopri5", "rtol": 1e-5}):
            for trace in ("exact", "hutchinson"):
                times = []
                with torch.no_grad():
                    for _ in range(3):
                        tic = time.perf_counter()
                        lp = flow.log_prob(x, trace=trace, num_probes=16, **solver)
                        times.append(time.perf_counter() - tic)
                nfe = flow.last_solve.nfe
                if trace == "exact":
                    exact[solver["method"]] = lp
                err = (lp - exact[solver["method"]]).abs()
                rows.append({"D": D, "solver": solver["method"], "trace": trace, "nfe": nfe,
                             "median_s": statistics.median(times),
                             "ms_per_point": 1e3 * statistics.median(times) / len(x),
                             "abs_err_vs_exact_median": float(err.median()),
                             "mean_log_prob": float(lp.mean())})
    print(f"{'D':>3}{'solver':>12}{'trace':>12}{'NFE':>6}{'median s':>10}{'ms/point':>10}"
          f"{'|err| vs exact':>16}")
    for r in rows:
        print(f"{r['D']:>3}{r['solver']:>12}{r['trace']:>12}{r['nfe']:>6}{r['median_s']:>10.3f}"
              f"{r['ms_per_point']:>10.3f}{r['abs_err_vs_exact_median']:>16.2e}")
    out = {"machine": {"platform": platform.platform(), "torch": torch.__version__,
                       "threads": torch.get_num_threads()}, "points": 256, "rows": rows}
    path = Path(__file__).parent / "results" / "logprob.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
