"""Issue-5 figures, question 3: the cost of a log-density, D = 2, 16, 64.

For each D: a flow fitted briefly (200 steps, residual MLP 128x3, so one evaluation costs what
a trained network costs) to samples of a random 3-component Gaussian mixture; then
``log_prob`` of 256 points with the exact trace (``torch.func`` vector-Jacobian products,
vectorized over the D basis vectors) and with the Hutchinson estimate (16 fixed Rademacher
probes), each with the fixed-grid ``warped_rk4`` (12 steps) and adaptive ``dopri5`` at
rtol 1e-5. Median of 3 wall times (the four solver and trace pairs of one D timed
round-robin), NFE, and the Hutchinson error against the exact trace.

    python benchmarks/bench_logprob.py [--quick]

``--quick``: 100 fitting steps, 64 points, one timed call each, written to
benchmarks/results/quick/logprob.json.

Prints a table and writes benchmarks/results/logprob.json.
"""

from __future__ import annotations

from functools import partial

import torch
from _harness import median_times, parser, write_results

import pyro_inflow as pif

CASES = [(solver, trace)
         for solver in ({"method": "warped_rk4", "num_steps": 12, "rtol": 1.0},
                        {"method": "dopri5", "rtol": 1e-5})
         for trace in ("exact", "hutchinson")]


def samples(D: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(3, D, generator=gen) * 1.5
    A = torch.randn(3, D, D, generator=gen) * 0.4
    k = torch.randint(3, (n,), generator=gen)
    eps = torch.randn(n, D, 1, generator=gen)
    return m[k] + (A[k] @ eps).squeeze(-1)


def timed(flow, x: torch.Tensor, repeats: int) -> list[tuple]:
    """``(log_prob, SolveInfo, median s)`` of each of ``CASES``, timed round-robin; the
    log-densities and infos are those of each case's last call."""
    results: list = [None] * len(CASES)

    def call(i: int) -> None:
        solver, trace = CASES[i]
        results[i] = flow.log_prob(x, trace=trace, num_probes=16, return_info=True, **solver)

    with torch.no_grad():
        times = median_times([partial(call, i) for i in range(len(CASES))], repeats)
    return [(*r, t) for r, t in zip(results, times)]


def main() -> None:
    a = parser(__doc__.splitlines()[0]).parse_args()
    steps, points, repeats = (100, 64, 1) if a.quick else (200, 256, 3)
    rows = []
    for D in (2, 16, 64):
        data = samples(D, 20_000, seed=D)
        flow = pif.InflationaryFlow.fit(data, steps=steps, progress=False).double()
        x = samples(D, points, seed=100 + D).double()
        exact = {}
        for (solver, trace), (lp, info, median_s) in zip(CASES, timed(flow, x, repeats)):
            if trace == "exact":
                exact[solver["method"]] = lp
            err = (lp - exact[solver["method"]]).abs()
            rows.append({"D": D, "solver": solver["method"], "trace": trace, "nfe": info.nfe,
                         "median_s": median_s, "ms_per_point": 1e3 * median_s / len(x),
                         "abs_err_vs_exact_median": float(err.median()),
                         "mean_log_prob": float(lp.mean())})
    print(f"{'D':>3}{'solver':>12}{'trace':>12}{'NFE':>6}{'median s':>10}{'ms/point':>10}"
          f"{'|err| vs exact':>16}")
    for r in rows:
        print(f"{r['D']:>3}{r['solver']:>12}{r['trace']:>12}{r['nfe']:>6}{r['median_s']:>10.3f}"
              f"{r['ms_per_point']:>10.3f}{r['abs_err_vs_exact_median']:>16.2e}")
    write_results("logprob", {"points": points, "rows": rows}, a.quick)


if __name__ == "__main__":
    main()
