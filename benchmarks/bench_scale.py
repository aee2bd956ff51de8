"""Issue 5, question 5: D = 64 (the 8x8 digits) with PR-reducing schedules to d = 4, 8, 16.

For each schedule (PR-preserving d = 64, and PR-reducing d = 16, 8, 4), in a fresh process so
that its peak memory is its own: default training (``InflationaryFlow.fit``: up to 4,000
steps x 512, residual MLP 128x3, float32) with early stopping (``patience=4``: stop after four
validation checks without improvement and keep the best EMA weights; 1,350 images is little
data for a 64-D flow, and without it the held-out latents spread out after about step 1,000)
on 1,500 digits; then on the 297 held-out digits, encode and decode throughput (points per
second, float32, with the adaptive ``dopri5`` at rtol 1e-5 and the fixed ``warped_rk4`` grid of
12 steps), the roundtrip (PRP) or reconstruction (PRR) error of the clean digits in pixel
units of ``[0, 1)``, and the latent coverage error (chi-square(d) regions, five levels) of the
held-out digits plus the flow's ``t = 0`` noise (``flow.add_t0_noise``, seed 0: the
distribution the flow transports; see ``flow_calibration``). With 297 points one binomial s.e.
is about 0.03. Peak memory is the process's maximum resident set size, with the size after
imports alongside.

    python benchmarks/bench_scale.py [--quick] [--steps 4000] [--patience 4]

Needs scikit-learn (``pip install "pyro-inflow[digits]"``). Writes
``benchmarks/results/scale.json``. ``--quick``: 300 training steps and two schedules
(PR-preserving, PR-reducing to d = 8), written to ``benchmarks/results/quick/``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from _harness import parser, write_results

CONFIGS = [("prp", None), ("prr", 16), ("prr", 8), ("prr", 4)]
QUICK_CONFIGS = [("prp", None), ("prr", 8)]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def one(schedule: str, d: int | None, steps: int, patience: int | None) -> dict:
    import torch

    from pyro_inflow import InflationaryFlow, datasets, latent_coverage

    base_mib = _rss_mib()
    x = datasets.load("digits", seed=0)
    train, held = x[:1500], x[1500:].double()
    tic = time.perf_counter()
    flow = InflationaryFlow.fit(train, schedule=schedule, dims_to_keep=d, steps=steps,
                                patience=patience, progress=False)
    train_s = time.perf_counter() - tic
    row = {"schedule": schedule, "d": flow.latent_dim, "t_max": flow.schedule.t_max,
           "train_s": train_s, "samples_seen": flow.history["samples_seen"][-1],
           "steps_run": flow.history["step"][-1], "best_step": flow.history.get("best_step")}
    noised = flow.add_t0_noise(held, generator=torch.Generator().manual_seed(0)).float()
    for name, solver in (("dopri5", {"method": "dopri5", "rtol": 1e-5}),
                         ("warped_rk4", {"method": "warped_rk4", "num_steps": 12})):
        with torch.no_grad():
            tic = time.perf_counter()
            z, enc = flow.encode(held.float(), return_info=True, **solver)
            enc_s = time.perf_counter() - tic
            enc_nfe = enc.nfe
            tic = time.perf_counter()
            back, dec = flow.decode(z, return_info=True, **solver)
            dec_s = time.perf_counter() - tic
            dec_nfe = dec.nfe
            z_noised = flow.encode(noised, **solver)
        err = (back.double() - held).square().mean().sqrt().item()
        cov = latent_coverage(z_noised.double())
        row[name] = {"encode_points_per_s": len(held) / enc_s, "encode_nfe": enc_nfe,
                     "decode_points_per_s": len(held) / dec_s, "decode_nfe": dec_nfe,
                     "error_rms": err, "coverage_max_abs_error": cov["max_abs_error"]}
    with torch.no_grad():  # decode throughput on a larger batch of prior draws
        z = torch.randn(4096, flow.latent_dim, generator=torch.Generator().manual_seed(0))
        tic = time.perf_counter()
        flow.decode(z, method="warped_rk4", num_steps=12)
        row["sample_points_per_s_4096"] = 4096 / (time.perf_counter() - tic)
    row["peak_rss_mib"] = _rss_mib()
    row["rss_after_imports_mib"] = base_mib
    return row


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="default 4000; 300 with --quick")
    p.add_argument("--patience", type=int, default=4, help="0: no early stopping")
    p.add_argument("--one", nargs=2, metavar=("SCHEDULE", "D"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.steps is None:
        a.steps = 300 if a.quick else 4000
    if a.one:
        d = None if a.one[1] == "none" else int(a.one[1])
        print(json.dumps(one(a.one[0], d, a.steps, a.patience or None)))
        return
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise SystemExit('bench_scale needs scikit-learn: pip install "pyro-inflow[digits]"'
                         ) from None
    rows = []
    for schedule, d in QUICK_CONFIGS if a.quick else CONFIGS:
        run = subprocess.run([sys.executable, __file__, "--steps", str(a.steps),
                              "--patience", str(a.patience), "--one",
                              schedule, "none" if d is None else str(d)],
                             capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"{schedule} d={d} failed:\n{run.stderr[-3000:]}")
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(f"  done {schedule} d={rows[-1]['d']} in {rows[-1]['train_s']:.0f} s",
              file=sys.stderr)
    print(f"digits (D = 64), 1,500 training / 297 held-out images, up to {a.steps} steps x 512,"
          f" patience {a.patience or 'off'}, {os.cpu_count()} cores; coverage on noised points")
    print(f"{'schedule':>8} {'d':>3} {'train s':>8} {'steps':>6} {'best':>6} | {'solver':>10} "
          f"{'enc pts/s':>10} {'NFE':>4} {'dec pts/s':>10} {'NFE':>4} {'rms err':>8} "
          f"{'cov err':>8} | "
          f"{'sample pts/s':>12} {'peak MiB':>9}")
    for r in rows:
        for i, name in enumerate(("dopri5", "warped_rk4")):
            s = r[name]
            head = (f"{r['schedule']:>8} {r['d']:>3} {r['train_s']:>8.1f} {r['steps_run']:>6} "
                    f"{r['best_step'] or '-':>6}" if i == 0 else " " * 35)
            tail = (f"{r['sample_points_per_s_4096']:>12,.0f} {r['peak_rss_mib']:>9.0f}"
                    if i == 0 else "")
            print(f"{head} | {name:>10} {s['encode_points_per_s']:>10,.0f} {s['encode_nfe']:>4} "
                  f"{s['decode_points_per_s']:>10,.0f} {s['decode_nfe']:>4} "
                  f"{s['error_rms']:>8.1e} {s['coverage_max_abs_error']:>8.3f} | {tail}")
    write_results("scale", {"steps": a.steps, "patience": a.patience or None,
                            "coverage_points": "held-out + t0 noise (seed 0)", "rows": rows},
                  a.quick)


if __name__ == "__main__":
    main()
