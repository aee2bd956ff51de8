"""Issue 21: priors from small real samples. Held-out calibration of the flow on the 8x8 digits
(1,500 training images, 297 held out) against Gaussians, over several splits.

For each split (``datasets.load("digits", seed=s)``: a permutation of the 1,797 images and
fresh dequantization noise; the first 1,500 train, the other 297 are held out), these priors are
fitted to the 1,500 training images:

* ``flow``: ``InflationaryFlow.fit`` with default settings (``--flow-settings`` adds
  keyword settings as JSON, for comparisons);
* ``gaussian``: a Gaussian with the sample mean and covariance;
* ``ledoit-wolf``: the same with the Ledoit-Wolf shrunk covariance;
* ``gaussian (n-1)/(n-D-2)``: the sample covariance inflated by the factor that makes the
  expected held-out squared Mahalanobis distance right for Gaussian data;
* ``flow, not recalibrated``: where the flow failed its held-out check and ``fit``
  recalibrated its latent (``flow.radial``, fitted on the 150 images ``fit`` held out, never
  the 297), the same network without that map;
* ``flow, map from K folds`` (with ``--folds K``, an experiment, not what ``fit`` does): the
  same network with the map fitted on ``150 K`` held-out images instead of 150: its own 150,
  and those of ``K - 1`` more networks trained the same way, each holding out another 150 of
  the training images (so every radius comes from a network that never saw that image). It
  asks how much of the error is the map's estimation noise, at ``K`` times the training.

Every prior is judged as the flow is: the held-out digits plus the flow's ``t = 0`` noise
``N(0, gamma0 scale^2)`` (the Gaussians get the same noise added to their covariance), the
share inside the chi-square(d) regions at levels 0.5, 0.68, 0.9, 0.95, 0.99, and the
"coverage error", the largest ``|coverage - level|``. Also the held-out log-likelihood per image
(nats, of the clean images; the flow's with the exact trace) and the flow's own certificate
(its check on its validation split). The table ends with each prior's mean error over the
splits, its error on the pooled held-out latents of all splits, and the *noise floor*: the
mean error a perfectly calibrated prior would show on the same number of points (simulated).

    python benchmarks/bench_small.py [--quick] [--splits 3] [--flow-settings '{"hidden": 64}'
                                     --tag NAME] [--folds 4]

Needs scikit-learn. Writes ``benchmarks/results/small.json`` (``small_NAME.json`` with
``--tag``).
"""

from __future__ import annotations

import copy
import json
import math
import time

import numpy as np
import torch
from _harness import parser, write_results
from scipy import stats

from pyro_inflow import InflationaryFlow, datasets
from pyro_inflow.basis import ledoit_wolf
from pyro_inflow.calibration import LEVELS, latent_coverage
from pyro_inflow.radial import fit_radial_map
from pyro_inflow.training.trainer import split

N_TRAIN = 1500


def noise_floor(n: int, d: int, reps: int = 4000, seed: int = 0) -> float:
    """Mean coverage error of a perfectly calibrated prior on ``n`` points (simulated)."""
    rng = np.random.default_rng(seed)
    r2 = rng.chisquare(d, size=(reps, n))
    q = stats.chi2.ppf(LEVELS, d)
    cover = (r2[:, :, None] <= q).mean(1)
    return float(np.abs(cover - np.asarray(LEVELS)).max(1).mean())


def gaussian_prior(xtr: np.ndarray, cov: np.ndarray, gamma0: float) -> dict:
    """A Gaussian prior in the flow's convention: covariance plus ``gamma0 scale^2 I``."""
    top = float(np.linalg.eigvalsh(np.cov(xtr.T)).max())  # the flow's scale^2
    noise = gamma0 * top
    full = cov + noise * np.eye(cov.shape[0])
    return {"mean": xtr.mean(0), "chol": np.linalg.cholesky(full), "noise_sd": math.sqrt(noise),
            "dist": stats.multivariate_normal(xtr.mean(0), full)}


def judge_gaussian(prior: dict, xte: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    rng = np.random.default_rng(seed)
    noisy = xte + prior["noise_sd"] * rng.standard_normal(xte.shape)
    z = np.linalg.solve(prior["chol"], (noisy - prior["mean"]).T).T
    return z, float(prior["dist"].logpdf(xte).mean())


def judge_flow(flow: InflationaryFlow, xte: torch.Tensor, seed: int) -> tuple[np.ndarray, float]:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = flow.encode(flow.add_t0_noise(xte, generator=gen), method="warped_rk4",
                        num_steps=12)
        # float64 points: the flow computes them in float64 (a converted copy)
        lp = flow.log_prob(xte.double(), trace="exact", method="warped_rk4", num_steps=12)
    return z.double().numpy(), float(lp.mean())


def heldout_radii(flow: InflationaryFlow, x: torch.Tensor, seed: int) -> torch.Tensor:
    """Squared latent radii ``(n,)`` of held-out points ``x`` plus the ``t = 0`` noise, encoded
    as ``fit``'s check encodes them: the kept coordinates of the end state ``w(T)``, before
    the latent's radial map."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = flow.encode_full(flow.add_t0_noise(x, generator=gen), method="warped_rk4",
                             num_steps=12)
    return w[..., flow.schedule.kept].double().square().sum(-1)


def map_from_folds(flow: InflationaryFlow, xtr: torch.Tensor, folds: int,
                   settings: dict) -> InflationaryFlow:
    """``flow`` with its radial map refitted on the held-out radii of ``folds`` networks: its
    own validation images and ``folds - 1`` more slices of as many training images, each held
    out (for early stopping and the radii) by a network trained as ``flow`` was."""
    seed = int(settings.get("seed", 0))
    tr_idx, val_idx = split(len(xtr), float(settings.get("validation_fraction", 0.1)),
                            torch.Generator().manual_seed(seed))  # fit's own split
    m = len(val_idx)
    rest = tr_idx[torch.randperm(len(tr_idx), generator=torch.Generator().manual_seed(1))]
    r2 = [heldout_radii(flow, xtr[val_idx], 0)]
    for j in range(folds - 1):
        hold = rest[j * m:(j + 1) * m]
        others = torch.cat([rest[:j * m], rest[(j + 1) * m:], val_idx])
        xp = torch.empty_like(xtr)  # the same split positions, holding out ``hold``
        xp[val_idx], xp[tr_idx] = xtr[hold], xtr[others]
        other = InflationaryFlow.fit(xp, progress=False, **{**settings, "recalibrate": False})
        r2.append(heldout_radii(other, xtr[hold], j + 1))
    out = copy.deepcopy(flow)
    out.radial = fit_radial_map(torch.cat(r2), flow.latent_dim, dtype=flow.dtype)
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--splits", type=int, default=3)
    p.add_argument("--flow-settings", default="{}", help="JSON keyword settings of fit")
    p.add_argument("--tag", default=None, help="write small_TAG.json (a variant's results)")
    p.add_argument("--folds", type=int, default=1, help="also fit the flow's radial map on "
                   "the held-out images of this many networks (an experiment; K x training)")
    a = p.parse_args()
    settings = json.loads(a.flow_settings)
    if a.quick:
        settings.setdefault("steps", 300)
    splits = 1 if a.quick else a.splits
    rows, latents = [], {}
    for s in range(splits):
        x = datasets.load("digits", seed=s)
        xtr, xte = x[:N_TRAIN], x[N_TRAIN:]
        xtr64, xte64 = xtr.double().numpy(), xte.double().numpy()
        tic = time.perf_counter()
        flow = InflationaryFlow.fit(xtr, progress=False, **settings)
        train_s = time.perf_counter() - tic
        gamma0 = flow.schedule.gamma0
        n = len(xtr64)
        S = np.cov(xtr64.T)
        xc = torch.as_tensor(xtr64 - xtr64.mean(0))
        a_lw = ledoit_wolf(xc)
        S_ml = S * (n - 1) / n
        lw = (1 - a_lw) * S_ml + a_lw * np.trace(S_ml) / S.shape[0] * np.eye(S.shape[0])
        priors = {"gaussian": gaussian_prior(xtr64, S, gamma0),
                  "ledoit-wolf": gaussian_prior(xtr64, lw, gamma0),
                  "gaussian (n-1)/(n-D-2)": gaussian_prior(
                      xtr64, S * (n - 1) / (n - S.shape[0] - 2), gamma0)}
        results = {"flow": judge_flow(flow, xte, seed=100 + s)}
        if flow.radial is not None:  # the same network without the latent's recalibration
            plain = copy.deepcopy(flow)
            plain.radial = None
            results["flow, not recalibrated"] = judge_flow(plain, xte, seed=100 + s)
            if a.folds > 1:
                tic = time.perf_counter()
                folded = map_from_folds(flow, xtr, a.folds, settings)
                results[f"flow, map from {a.folds} folds"] = judge_flow(folded, xte, 100 + s)
                print(f"split {s}: {a.folds - 1} more networks in "
                      f"{time.perf_counter() - tic:.0f} s, map {folded.radial.config()} "
                      f"against {flow.radial.config()}", flush=True)
        for name, prior in priors.items():
            results[name] = judge_gaussian(prior, xte64, seed=100 + s)
        for name, (z, ll) in results.items():
            cov = latent_coverage(z)
            latents.setdefault(name, []).append(z)
            row = {"split": s, "prior": name, "coverage": cov["coverage"],
                   "error": cov["max_abs_error"], "loglik": ll, "n": cov["n"]}
            if name == "flow":
                h = flow.history
                row.update(train_s=train_s, steps=h["step"][-1], best_step=h.get("best_step"),
                           certificate=flow.certificate, shrinkage_lw=a_lw)
            rows.append(row)
            print(f"split {s} {name:>24}: error {row['error']:.3f} "
                  f"coverage {np.round(cov['coverage'], 3).tolist()} loglik {ll:.1f}"
                  + (f" ({train_s:.0f} s, {row['steps']} steps, certificate "
                     f"{flow.certificate['max_abs_error']:.3f} on {flow.certificate['n']})"
                     if name == "flow" else ""), flush=True)
    d = x.shape[1]
    floor_one, floor_pool = noise_floor(len(xte), d), noise_floor(len(xte) * splits, d)
    summary = {}
    print(f"\n| prior | mean coverage error over {splits} splits | pooled ({len(xte) * splits} "
          f"points) | mean held-out log-lik |")
    print("|---|---|---|---|")
    for name, zs in latents.items():
        errs = [r["error"] for r in rows if r["prior"] == name]
        pooled = latent_coverage(np.concatenate(zs))
        lls = [r["loglik"] for r in rows if r["prior"] == name]
        summary[name] = {"mean_error": float(np.mean(errs)), "errors": errs,
                         "pooled_error": pooled["max_abs_error"],
                         "pooled_coverage": pooled["coverage"],
                         "mean_loglik": float(np.mean(lls))}
        print(f"| {name} | {np.mean(errs):.3f} ({', '.join(f'{e:.3f}' for e in errs)}) | "
              f"{pooled['max_abs_error']:.3f} | {np.mean(lls):.1f} |")
    print(f"| a perfectly calibrated prior (noise floor) | {floor_one:.3f} | {floor_pool:.3f} "
          f"| |")
    payload = {"settings": settings, "splits": splits, "folds": a.folds, "rows": rows,
               "summary": summary, "noise_floor": {"one_split": floor_one, "pooled": floor_pool}}
    write_results("small" if a.tag is None else f"small_{a.tag}", payload, a.quick)


if __name__ == "__main__":
    main()
