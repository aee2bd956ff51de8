"""Engine figures for issue 2: default training on the toys, and the exact denoisers' speed.

For each toy data set: train with default settings on 20,000 points (seed 1), then on 5,000
unseen points (seed 2) measure latent coverage of chi-square regions, roundtrip error and
encode/decode cost. Also time one EmpiricalDenoiser call, 20,000 reference points x 10,000
queries (median of 5). Prints a table and writes benchmarks/results/engine.json.

    python benchmarks/bench_engine.py [--quick]

``--quick``: 300 training steps and two toys (moons PR-preserving and PR-reducing), written
to benchmarks/results/quick/engine.json.
"""

from __future__ import annotations

import statistics
import time

import torch
from _harness import parser, wall_times, write_results

import pyro_inflow as pif
from pyro_inflow import EmpiricalDenoiser, InflationSchedule
from pyro_inflow.calibration.coverage import error_norms


def toy_row(name: str, schedule: str, d: int | None, steps: int | None) -> dict:
    data = pif.datasets.load(name, n=20_000, seed=1)
    held = pif.datasets.load(name, n=5000, seed=2)
    kw = {"schedule": schedule, "dims_to_keep": d, "progress": False}
    if steps:
        kw["steps"] = steps
    tic = time.perf_counter()
    flow = pif.InflationaryFlow.fit(data, **kw)
    train_s = time.perf_counter() - tic
    with torch.no_grad():
        tic = time.perf_counter()
        wT, enc = flow.encode_full(held, return_info=True)
        enc_s, enc_nfe = time.perf_counter() - tic, enc.nfe
        tic = time.perf_counter()
        back, dec = (flow.decode(wT[:, : flow.latent_dim], return_info=True) if d is None
                     else (None, None))
        dec_s = time.perf_counter() - tic
    cov = pif.latent_coverage(wT[:, : flow.latent_dim])
    rt = error_norms(held, back) if back is not None else None
    return {"data": name, "schedule": schedule, "d": flow.latent_dim, "train_s": train_s,
            "samples_seen": flow.history["samples_seen"][-1], "coverage": cov["coverage"],
            "max_cov_err": cov["max_abs_error"], "ks": cov["ks"],
            "roundtrip_rms": rt and rt["rms"], "roundtrip_max": rt and rt["max"],
            "encode_nfe": enc_nfe, "encode_s": enc_s, "decode_nfe": dec.nfe if rt else None,
            "decode_s": dec_s if rt else None}


def empirical_speed(repeats: int = 5) -> dict:
    sched = InflationSchedule(3)
    ref = pif.datasets.load("s_curve", n=20_000, seed=0)
    den = EmpiricalDenoiser(sched, ref)
    q = pif.datasets.load("s_curve", n=10_000, seed=1)
    [times] = wall_times([lambda: den(q, torch.tensor(2.0))], repeats)
    return {"refs": 20_000, "queries": 10_000, "median_s": statistics.median(times),
            "all_s": times}


def main() -> None:
    a = parser(__doc__.splitlines()[0]).parse_args()
    cases = [(n, "prp", None) for n in ("moons", "circles", "sine", "s_curve", "swiss_roll")]
    cases += [("moons", "prr", 1), ("swiss_roll", "prr", 1), ("s_curve", "prr", 2)]
    if a.quick:
        cases = cases[:1] + cases[5:6]
    rows = [toy_row(n, s, d, 300 if a.quick else None) for n, s, d in cases]
    emp = empirical_speed()
    print(f"{'data':<11}{'sched':<6}{'d':>2}{'train s':>9}{'samples':>11}{'max|cov-nom|':>14}"
          f"{'KS':>7}{'rt rms':>10}{'rt max':>10}{'enc NFE':>9}{'dec NFE':>9}")
    for r in rows:
        rt = f"{r['roundtrip_rms']:10.2e}{r['roundtrip_max']:10.2e}" if r["roundtrip_rms"] else (
            f"{'-':>10}{'-':>10}")
        print(f"{r['data']:<11}{r['schedule']:<6}{r['d']:>2}{r['train_s']:9.1f}"
              f"{r['samples_seen']:11,}{r['max_cov_err']:14.4f}{r['ks']:7.3f}{rt}"
              f"{r['encode_nfe']:9}{r['decode_nfe'] or '-':>9}")
    print(f"EmpiricalDenoiser 20,000 refs x 10,000 queries: median {emp['median_s']:.2f} s "
          f"over {len(emp['all_s'])} calls")
    write_results("engine", {"toys": rows, "empirical": emp}, a.quick)


if __name__ == "__main__":
    main()
