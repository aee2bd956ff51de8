"""Issue 21: priors from small real samples. Held-out calibration of the flow on the 8x8 digits
(1,500 training images, 297 held out) against Gaussians, over several splits.

For each split (``datasets.load("digits", seed=s)``: a permutation of the 1,797 images and
fresh dequantization noise; the first 1,500 train, the other 297 are held out), four priors are
fitted to the 1,500 training images:

* ``flow``: ``InflationaryFlow.fit`` with default settings (``--flow-settings`` adds
  keyword settings as JSON, for comparisons);
* ``gaussian``: a Gaussian with the sample mean and covariance;
* ``ledoit-wolf``: the same with the Ledoit-Wolf shrunk covariance;
* ``gaussian (n-1)/(n-D-2)``: the sample covariance inflated by the factor that makes the
  expected held-out squared Mahalanobis distance right for Gaussian data;
* ``flow + radial recalibration (chi2 | power)``: the flow composed with a radial map of its
  latent fitted on the flow's own validation split (the 150 images ``fit`` held out; never
  the 297), a spherically symmetric, heavier- or lighter-tailed latent (the log-likelihood
  includes the map's Jacobian): ``chi2``, the squared radius of those images taken as
  ``c chi2(nu)`` by its mean and variance and mapped onto ``chi2(d)`` by quantiles;
  ``power``, ``log r^2`` mapped affinely onto the mean and variance of ``log chi2(d)``.

Every prior is judged as the flow is: the held-out digits plus the flow's ``t = 0`` noise
``N(0, gamma0 scale^2)`` (the Gaussians get the same noise added to their covariance), the
share inside the chi-square(d) regions at levels 0.5, 0.68, 0.9, 0.95, 0.99, and the
"coverage error", the largest ``|coverage - level|``. Also the held-out log-likelihood per image
(nats, of the clean images; the flow's with the exact trace) and the flow's own certificate
(its check on its validation split). The table ends with each prior's mean error over the
splits, its error on the pooled held-out latents of all splits, and the *noise floor*: the
mean error a perfectly calibrated prior would show on the same number of points (simulated).

    python benchmarks/bench_small.py [--quick] [--splits 3] [--flow-settings '{"hidden": 64}'
                                     --tag NAME]

Needs scikit-learn. Writes ``benchmarks/results/small.json`` (``small_NAME.json`` with
``--tag``).
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import torch
from _harness import parser, write_results
from scipy import special, stats

from pyro_inflow import InflationaryFlow, datasets
from pyro_inflow.basis import ledoit_wolf
from pyro_inflow.calibration import LEVELS, latent_coverage
from pyro_inflow.calibration.certificate import CERTIFICATE_SOLVER
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


def radial_map(r2_val: np.ndarray, d: int, kind: str = "chi2"):
    """The squared-radius map fitted on validation latents; returns ``(map, log-Jacobian of
    the latent map z -> z rho(r) / r)``, both of ``r2``.

    ``"chi2"``: ``r2 -> F_d^-1(F_nu(r2 / c))``, with ``c chi2(nu)`` matched to their mean and
    variance. ``"power"``: ``log rho2 = a + b log r2``, with the mean and variance of
    ``log r2`` matched to those of ``log chi2(d)`` (``psi(d/2) + log 2`` and ``psi'(d/2)``):
    closed forms both ways."""
    if kind == "power":
        lr = np.log(r2_val)
        b = math.sqrt(special.polygamma(1, d / 2) / lr.var(ddof=1))
        a = special.digamma(d / 2) + math.log(2) - b * lr.mean()

        def new_r2(r2: np.ndarray) -> np.ndarray:
            return np.exp(a + b * np.log(r2))

        def log_jac(r2: np.ndarray) -> np.ndarray:  # rho = e^(a/2) r^b: log b + d log(rho / r)
            return math.log(b) + 0.5 * d * (a + (b - 1) * np.log(r2))

        return new_r2, log_jac
    m, v = r2_val.mean(), r2_val.var(ddof=1)
    c, nu = v / (2 * m), 2 * m * m / v

    def new_r2(r2: np.ndarray) -> np.ndarray:
        return stats.chi2.isf(stats.chi2.sf(r2 / c, nu), d)

    def log_jac(r2: np.ndarray) -> np.ndarray:
        rho2 = new_r2(r2)  # d rho2 / d r2 = f_nu(r2 / c) / (c f_d(rho2)); g' = (r / rho) of it
        dlog = stats.chi2.logpdf(r2 / c, nu) - math.log(c) - stats.chi2.logpdf(rho2, d)
        return dlog + 0.5 * (np.log(r2) - np.log(rho2)) + 0.5 * (d - 1) * (np.log(rho2)
                                                                           - np.log(r2))

    return new_r2, log_jac


def recalibrated(flow: InflationaryFlow, xtr: torch.Tensor, xte: torch.Tensor, z_te: np.ndarray,
                 loglik: float, settings: dict, kind: str) -> tuple[np.ndarray, float]:
    """The flow + a radial map fitted on the flow's own validation split (see the module)."""
    _, val_idx = split(len(xtr), settings.get("validation_fraction", 0.1),
                       torch.Generator().manual_seed(settings.get("seed", 0)))
    x_val = xtr[val_idx].to(flow.dtype)
    gen = torch.Generator().manual_seed(settings.get("seed", 0))
    with torch.no_grad():
        z_val = flow.encode(flow.add_t0_noise(x_val, generator=gen), **CERTIFICATE_SOLVER)
        z_clean = flow.encode(xte, method="warped_rk4", num_steps=12).double().numpy()
    cov = latent_coverage(z_val)["coverage"]
    assert np.allclose(cov, flow.certificate["coverage"]), "not the flow's validation split"
    new_r2, log_jac = radial_map((z_val.double().numpy() ** 2).sum(1), z_te.shape[1],
                                 kind)
    r2 = (z_te**2).sum(1)
    z = z_te * np.sqrt(new_r2(r2) / r2)[:, None]
    r2c = (z_clean**2).sum(1)  # the density: N(g(z)) |g'| against the flow's N(z)
    delta = -0.5 * (new_r2(r2c) - r2c) + log_jac(r2c)
    return z, loglik + float(delta.mean())


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--splits", type=int, default=3)
    p.add_argument("--flow-settings", default="{}", help="JSON keyword settings of fit")
    p.add_argument("--tag", default=None, help="write small_TAG.json (a variant's results)")
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
        for kind in ("chi2", "power"):
            results[f"flow + radial recalibration ({kind})"] = recalibrated(
                flow, xtr, xte, *results["flow"], settings, kind)
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
    payload = {"settings": settings, "splits": splits, "rows": rows, "summary": summary,
               "noise_floor": {"one_split": floor_one, "pooled": floor_pool}}
    write_results("small" if a.tag is None else f"small_{a.tag}", payload, a.quick)


if __name__ == "__main__":
    main()
