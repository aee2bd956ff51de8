"""Issue 6, question 2: the digits inverse problem, NUTS in the latent vs mean-field SVI.

A PR-preserving flow is trained on 1,500 digits (``datasets.load("digits")``, default
settings with early stopping, ``patience=4``). ``K`` held-out digits (of the 297 the flow
never saw) each lose a random half of their pixels, and the other half is observed with
``N(0, sigma = 0.1)`` noise (:func:`pyro_inflow.examples.corrupt`). The model is
:func:`pyro_inflow.examples.inpainting_model`: the ``K`` digits in one ``pyro.plate``, so one
NUTS run samples all ``K`` independent posteriors. Mean-field SVI (``AutoNormal`` in the same
latent) runs on the same model first, and NUTS (maximum tree depth 8) starts where it ended.
For both, the table gives the fraction of true pixels inside the central 50 % and 90 %
posterior intervals (hidden and observed pixels apart), the RMS error of the posterior mean,
the mean 90 % interval width, and the wall time; for NUTS also the bulk ESS (median over the
``K x 64`` pixels) and the divergences.

    python benchmarks/bench_inverse.py [--quick] [--digits 20] [--draws 120] [--svi-steps 2000]

Needs scikit-learn (``pip install "pyro-inflow[digits]"``). Writes
``benchmarks/results/inverse.json``. ``--quick``: at most 500 training steps, 2 digits,
10 warm-up + 10 draws and 200 SVI steps, written to ``benchmarks/results/quick/``.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from _harness import parser, write_results
from pyro.infer.autoguide import init_to_value

import pyro_inflow as pif
from pyro_inflow.calibration import interval_coverage
from pyro_inflow.calibration.coverage import as_numpy
from pyro_inflow.examples import corrupt, inpainting_model
from pyro_inflow.posterior import mcse_mean


def scores(draws: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> dict:
    out = {"rmse_posterior_mean": float((draws.mean(0) - truth).square().mean().sqrt())}
    observed = mask.cpu().numpy().astype(bool)
    for level in (0.5, 0.9):
        c = interval_coverage(draws, truth, level)
        key = f"{round(100 * level)}"
        out[f"coverage_{key}_hidden"] = float(c["inside"][~observed].mean())
        out[f"coverage_{key}_observed"] = float(c["inside"][observed].mean())
        out[f"coverage_{key}_all"] = c["coverage"]
        if level == 0.9:
            out["width_90"] = c["width"]
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--digits", type=int, default=None,
                   help="held-out digits K (default 20; 2 with --quick)")
    p.add_argument("--draws", type=int, default=None,
                   help="NUTS warm-up steps = draws (default 120; 10 with --quick)")
    p.add_argument("--svi-steps", type=int, default=None, help="default 2000; 200 with --quick")
    p.add_argument("--sigma", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    for name, full, quick in (("digits", 20, 2), ("draws", 120, 10), ("svi_steps", 2000, 200)):
        if getattr(a, name) is None:
            setattr(a, name, quick if a.quick else full)
    if a.threads:
        torch.set_num_threads(a.threads)
    x = pif.datasets.load("digits", seed=0)
    train, held = x[:1500], x[1500:1500 + a.digits]
    tic = time.perf_counter()
    flow = pif.InflationaryFlow.fit(train, patience=4, progress=False,
                                    **({"steps": 500} if a.quick else {}))
    train_s = time.perf_counter() - tic
    cal = pif.flow_calibration(flow, x[1500:], method="warped_rk4", num_steps=12)
    y, mask = corrupt(held, hidden=0.5, sigma=a.sigma, seed=0)
    model = inpainting_model(flow, sigma=a.sigma)

    tic = time.perf_counter()
    fit = pif.latent_svi(model, y, mask, guide="normal", num_steps=a.svi_steps)
    svi_s = time.perf_counter() - tic
    svi_x = pif.posterior_samples(fit, y, mask, num_samples=1000)["x"]
    svi = {"wall_s": svi_s, **scores(svi_x, held, mask)}

    tic = time.perf_counter()
    # started where SVI ended: from a prior draw, the first warm-up trees of the
    # K x 64-dimensional latent ran to the maximum depth with tiny steps
    init = init_to_value(values={k: v.detach() for k, v in fit.guide.median(y, mask).items()})
    mcmc = pif.latent_nuts(model, y, mask, num_samples=a.draws, warmup_steps=a.draws,
                           init_strategy=init, max_tree_depth=8)
    nuts_s = time.perf_counter() - tic
    stats = mcmc.kernel._stats
    nuts_x = pif.posterior_samples(mcmc)["x"]
    flat = as_numpy(nuts_x).reshape(a.draws, -1).astype(np.float64)
    ess = np.array([mcse_mean(flat[None, :, j])[2] for j in range(flat.shape[1])])
    nuts = {"wall_s": nuts_s, **scores(nuts_x, held, mask),
            "ess_bulk_median": float(np.median(ess)),
            "ess_bulk_min": float(np.min(ess)),
            "divergences": int(sum(stats["diverging"])),
            "mean_tree_depth": float(np.mean(stats["tree_depth"]))}

    cov = cal["coverage"]
    print(f"digits inverse problem: {a.digits} held-out digits, half the pixels hidden, "
          f"sigma {a.sigma} on the rest; flow trained in {train_s:.0f} s (best validation at "
          f"step {flow.history.get('best_step')}), held-out latent coverage "
          f"{np.round(cov['coverage'], 3).tolist()} ({cov['verdict']}); "
          f"{os.cpu_count()} cores")
    print(f"{'method':>24} {'50% hid':>8} {'50% obs':>8} {'90% hid':>8} {'90% obs':>8} "
          f"{'rmse':>6} {'width90':>8} {'wall s':>7}")
    for name, r in (("NUTS in the latent", nuts), ("mean-field SVI (latent)", svi)):
        print(f"{name:>24} {r['coverage_50_hidden']:>8.3f} {r['coverage_50_observed']:>8.3f} "
              f"{r['coverage_90_hidden']:>8.3f} {r['coverage_90_observed']:>8.3f} "
              f"{r['rmse_posterior_mean']:>6.3f} {r['width_90']:>8.3f} {r['wall_s']:>7.0f}")
    print(f"NUTS: {a.draws} warm-up + {a.draws} draws, bulk ESS per pixel median "
          f"{nuts['ess_bulk_median']:.0f} (min {nuts['ess_bulk_min']:.0f}), mean tree depth "
          f"{nuts['mean_tree_depth']:.1f}, {nuts['divergences']} divergences")
    write_results("inverse", {
        "settings": vars(a), "train_s": train_s, "best_step": flow.history.get("best_step"),
        "latent_coverage": cov["coverage"], "latent_verdict": cov["verdict"],
        "nuts": nuts, "svi": svi}, a.quick)


if __name__ == "__main__":
    main()
