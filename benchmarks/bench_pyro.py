"""Issue-3 figures: the flow as a Pyro prior.

1. Gradients through the decode: direct backpropagation vs the adjoint method, at three
   tolerances and two batch sizes (median wall time of decode + backward, NFE, decode error
   against an rtol=1e-9 reference, largest gradient difference between the two methods).
2. A 2-D moons prior and one ambiguous observation ``y = x0 + x1 + Normal(0, 0.3)``, y = 0.5:
   NUTS in the latent of our prior vs NUTS directly on x under a Pyro spline-coupling flow
   prior trained on the same data, both in this run: held-out log-likelihood of each prior,
   wall time, ESS bulk/tail (ArviZ, data coordinates, worst coordinate) per second,
   divergences and the cost of one potential-energy gradient.

    python benchmarks/bench_pyro.py [--quick]

Prints tables and writes benchmarks/results/pyro.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import arviz as az
import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.infer import MCMC, NUTS

import pyro_inflow as pif

Y_OBS, NOISE = 0.5, 0.3


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def gradient_table(flow, repeats: int) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 256):
        z0 = torch.randn(batch, 2, generator=gen)
        ref = flow.decode(z0, rtol=1e-9)
        for rtol in (1e-3, 1e-4, 1e-5):
            grads = {}
            for adjoint in (False, True):
                z = z0.clone().requires_grad_(True)

                def step(z=z, adjoint=adjoint, rtol=rtol):
                    z.grad = None
                    x = flow.decode(z, rtol=rtol, adjoint=adjoint)
                    x.square().sum().backward()
                    return x

                x = step()
                nfe = flow.last_solve.nfe
                grads[adjoint] = z.grad.clone()
                rows.append({
                    "batch": batch, "rtol": rtol, "method": "adjoint" if adjoint else "direct",
                    "median_s": median_time(step, repeats), "forward_nfe": nfe,
                    "decode_err_max": float((x.detach() - ref).abs().max()),
                })
            diff = float((grads[True] - grads[False]).abs().max())
            rows[-1]["grad_diff_vs_direct"] = rows[-2]["grad_diff_vs_direct"] = diff
    return rows


def spline_prior(data: torch.Tensor, steps: int, seed: int = 0):
    """A Pyro spline-coupling flow (4 couplings, alternating halves) fitted by max likelihood."""
    torch.manual_seed(seed)
    layers = []
    for _ in range(4):
        layers.append(T.spline_coupling(2, count_bins=16, bound=5.0))
        layers.append(T.Permute(torch.tensor([1, 0])))
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    flow_dist = dist.TransformedDistribution(base, layers[:-1])
    params = [p for t in layers if isinstance(t, torch.nn.Module) for p in t.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    tic = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(len(data), (512,), generator=gen)
        loss = -flow_dist.log_prob(data[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        flow_dist.clear_cache()
    for p in params:
        p.requires_grad_(False)
    return flow_dist, time.perf_counter() - tic


def gradient_cost(potential, dim: int, repeats: int) -> float:
    def step():
        z = torch.randn(dim, requires_grad=True)
        potential(z).backward()
    return median_time(step, repeats)


def run_nuts(model, num_samples, warmup, seed=0, latent=False) -> dict:
    pyro.set_rng_seed(seed)
    tic = time.perf_counter()
    if latent:
        mcmc = pif.latent_nuts(model, num_samples=num_samples, warmup_steps=warmup,
                               progress=False, seed=seed)
        wall = time.perf_counter() - tic
        x = pif.posterior_samples(mcmc)["x"]
    else:
        mcmc = MCMC(NUTS(model), num_samples=num_samples, warmup_steps=warmup,
                    disable_progbar=True)
        mcmc.run()
        wall = time.perf_counter() - tic
        x = mcmc.get_samples()["x"]
    x = x.detach().double().numpy()[None]  # (chain, draw, 2)
    ess_bulk = min(float(az.ess(x[..., i], method="bulk")) for i in range(2))
    ess_tail = min(float(az.ess(x[..., i], method="tail")) for i in range(2))
    div = len(mcmc.diagnostics()["divergences"]["chain 0"])
    stats = {"wall_s": wall, "ess_bulk": ess_bulk, "ess_tail": ess_tail,
             "ess_bulk_per_s": ess_bulk / wall, "ess_tail_per_s": ess_tail / wall,
             "divergences": div, "mean_x": x[0].mean(0).tolist(),
             "frac_x0_gt_0": float((x[0, :, 0] > 0).mean())}
    return stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="short training and chains")
    ap.add_argument("--rtol", type=float, default=None, help="prior tolerance (default: its own)")
    a = ap.parse_args()
    torch.set_num_threads(1)  # NUTS on one point: threads only add overhead
    steps, n_samp = (400, 100) if a.quick else (4000, 500)
    data = pif.datasets.load("moons", n=20_000, seed=1).float()
    held = pif.datasets.load("moons", n=5000, seed=2).float()

    tic = time.perf_counter()
    flow = pif.InflationaryFlow.fit(data, progress=False, steps=steps)
    ours_train = time.perf_counter() - tic
    grads = gradient_table(flow, repeats=3 if a.quick else 7)
    print(f"{'batch':>5}{'rtol':>8}{'method':>9}{'median ms':>11}{'fwd NFE':>9}"
          f"{'decode err':>12}{'|grad diff|':>13}")
    for r in grads:
        print(f"{r['batch']:>5}{r['rtol']:>8.0e}{r['method']:>9}{1e3 * r['median_s']:>11.1f}"
              f"{r['forward_nfe']:>9}{r['decode_err_max']:>12.1e}{r['grad_diff_vs_direct']:>13.1e}")

    spline, spline_train = spline_prior(data, steps=steps)
    with torch.no_grad():
        ll_ours = float(flow.log_prob(held).mean())
        ll_spline = float(spline.log_prob(held).mean())

    opts = {} if a.rtol is None else {"rtol": a.rtol}
    ours_prior = flow.prior(**opts)
    y = torch.tensor(Y_OBS)

    def ours_model():
        x = pyro.sample("x", ours_prior)
        pyro.sample("y", dist.Normal(x.sum(-1), NOISE), obs=y)

    def spline_model():
        x = pyro.sample("x", spline)
        pyro.sample("y", dist.Normal(x.sum(-1), NOISE), obs=y)

    # cost of one potential-energy gradient at a random point
    t_ours = ours_prior.transforms[0]
    cost_ours = gradient_cost(
        lambda z: -(dist.Normal(0.0, 1.0).log_prob(z).sum()
                    + dist.Normal(t_ours.with_cache(0)(z).sum(-1), NOISE).log_prob(y)), 2, 21)
    cost_spline = gradient_cost(
        lambda x: -(spline.log_prob(x) + dist.Normal(x.sum(-1), NOISE).log_prob(y)), 2, 21)

    ours = run_nuts(ours_model, n_samp, n_samp, latent=True)
    peer = run_nuts(spline_model, n_samp, n_samp)
    rows = [("inflationary flow, NUTS in latent", ll_ours, ours_train, cost_ours, ours),
            ("spline coupling, NUTS on x", ll_spline, spline_train, cost_spline, peer)]
    print(f"\n{'prior':<36}{'held-out LL':>12}{'train s':>9}{'grad ms':>9}{'wall s':>8}"
          f"{'ESS bulk':>10}{'ESS tail':>10}{'bulk/s':>8}{'tail/s':>8}{'div':>5}")
    for name, ll, tr, cost, s in rows:
        print(f"{name:<36}{ll:>12.3f}{tr:>9.1f}{1e3 * cost:>9.2f}{s['wall_s']:>8.1f}"
              f"{s['ess_bulk']:>10.0f}{s['ess_tail']:>10.0f}{s['ess_bulk_per_s']:>8.2f}"
              f"{s['ess_tail_per_s']:>8.2f}{s['divergences']:>5}")
    print(f"ratio ours/peer ESS bulk per second: "
          f"{ours['ess_bulk_per_s'] / peer['ess_bulk_per_s']:.2f}")
    out = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "settings": {"train_steps": steps, "num_samples": n_samp, "warmup": n_samp,
                     "prior_options": opts, "y": Y_OBS, "noise": NOISE},
        "gradients": grads,
        "nuts": {"ours": {"heldout_ll": ll_ours, "train_s": ours_train,
                          "grad_s": cost_ours, **ours},
                 "spline": {"heldout_ll": ll_spline, "train_s": spline_train,
                            "grad_s": cost_spline, **peer}},
    }
    path = Path(__file__).parent / "results" / ("pyro_quick.json" if a.quick else "pyro.json")
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
