"""Issue-5 figures, question 1: network evaluations (NFE) per roundtrip at a given accuracy.

On the same flow, compare the authors' fixed-step Euler (h = 0.01 on [0, T]), torchdiffeq's
adaptive dopri5 at three tolerances, and this package's ``warped_rk4`` (RK4 in a warped time,
fixed grid) at several step counts. For each: NFE of an encode + decode roundtrip, the
roundtrip error in data units (RMS, median and largest per point), the encode RMS error
against an rtol=1e-10 reference (standardized latent units), the solver's own error estimate
where it has one, and the wall time of the roundtrip on all points. Flows: two exact Gaussian
mixtures (2-D PRP, 3-D PR-reducing to 2) and flows trained with default settings on the five
toys, PR-preserving and PR-reducing (for PR-reducing flows the roundtrip is that of the full
D-dimensional ODE state, a measure of the solver; the library's decode then drops the
compressed coordinates).

    python benchmarks/bench_solvers.py [--quick] [--points 2000]

Prints a table and writes benchmarks/results/solvers.json. ``--quick``: the two exact
mixtures and moons trained for 300 steps, written to benchmarks/results/quick/solvers.json.
The Euler is the package's copy of the authors' (``pyro_inflow.examples.problems``).
"""

from __future__ import annotations

import time

import torch
from _harness import parser, write_results

import pyro_inflow as pif
from pyro_inflow.examples.problems import authors_euler
from pyro_inflow.solvers import solve


def mixture(D: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(3, generator=gen) + 0.2
    m = torch.randn(3, D, generator=gen) * 1.5
    A = torch.randn(3, D, D, generator=gen) * 0.4
    return w / w.sum(), m, A @ A.mT + 0.05 * torch.eye(D)


def rows_for(name: str, flow, x) -> list[dict]:
    flow = flow.double()
    x = x.double()
    T, field = flow.schedule.t_max, flow.field
    w0 = flow.to_state(x)
    ref = solve(field, w0, 0.0, T, rtol=1e-10)[0]
    to_x = flow.from_state
    rms = lambda a, b: float((a - b).square().sum(-1).mean().sqrt())  # noqa: E731
    cases = [("euler h=0.01", None)]
    cases += [(f"dopri5 rtol={r:g}", {"method": "dopri5", "rtol": r}) for r in (1e-3, 1e-4, 1e-5)]
    cases += [(f"warped_rk4 N={n}", {"method": "warped_rk4", "num_steps": n, "rtol": 1.0})
              for n in (6, 8, 12, 16)]
    rows = []
    for label, opts in cases:
        tic = time.perf_counter()
        if opts is None:
            wT, n1 = authors_euler(field, w0, 0.0, T)
            back, n2 = authors_euler(field, wT, T, 0.0)
            est = None
        else:
            wT, _, i1 = solve(field, w0, 0.0, T, **opts)
            back, _, i2 = solve(field, wT, T, 0.0, **opts)
            n1, n2, est = i1.nfe, i2.nfe, i1.error
        wall = time.perf_counter() - tic
        per_point = (to_x(back) - x).norm(dim=-1)
        rows.append({"flow": name, "T": T, "solver": label, "nfe_roundtrip": n1 + n2,
                     "roundtrip_rms": rms(to_x(back), x),
                     "roundtrip_median": float(per_point.median()),
                     "roundtrip_max": float(per_point.max()), "encode_rms": rms(wT, ref) /
                     wT.shape[-1] ** 0.5, "error_estimate": est, "wall_s": wall})
    euler_row = rows[0]
    for r in rows:
        r["nfe_ratio_vs_euler"] = euler_row["nfe_roundtrip"] / r["nfe_roundtrip"]
        r["beats_euler_roundtrip"] = r["roundtrip_rms"] <= euler_row["roundtrip_rms"]
        r["beats_euler_median"] = r["roundtrip_median"] <= euler_row["roundtrip_median"]
    return rows


def main() -> None:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=2000, help="held-out points per flow")
    a = ap.parse_args()
    torch.manual_seed(0)
    flows = []
    for D, sched, d in ((2, "prp", None), (3, "prr", 2)):
        w, m, S = mixture(D, seed=D)
        flow = pif.InflationaryFlow.from_gaussian_mixture(w, m, S, schedule=sched,
                                                          dims_to_keep=d)
        flows.append((f"mixture D={D} {sched}" + (f" d={d}" if d else ""), flow,
                      flow.sample(a.points, seed=1)))
    toys = [("moons", "prp", None)]
    if not a.quick:
        toys += [(n, "prp", None) for n in ("circles", "sine", "s_curve", "swiss_roll")]
        toys += [("moons", "prr", 1), ("swiss_roll", "prr", 1), ("s_curve", "prr", 2)]
    for name, sched, d in toys:
        data = pif.datasets.load(name, n=20_000, seed=1)
        flow = pif.InflationaryFlow.fit(data, schedule=sched, dims_to_keep=d, progress=False,
                                        **({"steps": 300} if a.quick else {}))
        label = f"{name} (trained)" + (f" prr d={d}" if d else "")
        flows.append((label, flow, pif.datasets.load(name, n=a.points, seed=2)))
    rows = []
    with torch.no_grad():
        for name, flow, x in flows:
            rows += rows_for(name, flow, x)
    print(f"{'flow':<32}{'solver':<20}{'NFE rt':>7}{'xEuler':>7}{'rt rms':>10}{'rt med':>10}"
          f"{'rt max':>10}{'enc rms':>10}"
          f"{'estimate':>10}{'wall s':>8}")
    for r in rows:
        est = f"{r['error_estimate']:10.1e}" if r["error_estimate"] is not None else f"{'-':>10}"
        mark = "" if r["beats_euler_roundtrip"] else "  (worse rt than Euler)"
        print(f"{r['flow']:<32}{r['solver']:<20}{r['nfe_roundtrip']:>7}"
              f"{r['nfe_ratio_vs_euler']:>7.1f}{r['roundtrip_rms']:>10.1e}"
              f"{r['roundtrip_median']:>10.1e}{r['roundtrip_max']:>10.1e}{r['encode_rms']:>10.1e}"
              f"{est}{r['wall_s']:>8.2f}{mark}")
    write_results("solvers", {"points": a.points, "rows": rows}, a.quick)


if __name__ == "__main__":
    main()
