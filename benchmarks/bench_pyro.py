"""Issue-3 figures: the flow as a Pyro prior.

1. Gradients through the decode: direct backpropagation vs the adjoint method, at two
   tolerances, two batch sizes and in float32 and float64 (median wall time of decode +
   backward, the solvers of one batch size and dtype timed round-robin; NFE, decode and
   gradient error against a float64 rtol=1e-9 reference).
   The prior's default, ``warped_rk4`` (fixed grid, direct backpropagation), is in the table.
2. A 2-D moons prior and one ambiguous observation ``y = x0 + x1 + Normal(0, 0.3)``, y = 0.5:
   NUTS in the latent of our prior vs NUTS directly on x under a Pyro spline-coupling flow
   prior trained on the same data, both in this run, 4 chains each from dispersed starts:
   held-out log-likelihood of each prior, wall time, ESS bulk/tail (ArviZ, data
   coordinates, worst coordinate; over all chains and per chain) per second, R-hat,
   divergences, the cost of one potential-energy gradient, and the posterior mass of the
   right-hand moon (x0 > 0) against its value by quadrature under the same prior. The
   posterior is bimodal: a chain that stays in one moon has a fine single-chain ESS and a
   wrong answer, which only the several-chain figures show. Also Pyro's NeuTra on the spline
   model (``AutoIAFNormal`` fitted by SVI, then ``NeuTraReparam`` and NUTS), same posterior.

    python benchmarks/bench_pyro.py [--quick] [--gradients] [--latent-only]

``--latent-only`` runs the latent-NUTS row of part 2 alone (with its quadrature), its chains in
worker processes (``latent_nuts``'s default) and then the same one after another in this
process, and writes benchmarks/results/pyro_latent.json. ``--gradients`` runs part 1 only, in
float32 and float64 (a few minutes), and writes benchmarks/results/pyro_gradients.json. ``--quick``:
400 training steps, 1 timing round, a 61 x 61 quadrature, 2 chains x (100 + 100), 300 NeuTra
steps, written to benchmarks/results/quick/.

The moons problem (``Y_OBS``, ``NOISE``, the model and the quadrature) is
:mod:`pyro_inflow.examples.problems`, shared with the tests and the demo.

Prints tables and writes benchmarks/results/pyro.json.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import arviz as az
import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from _harness import median_times, parser, write_results
from pyro import poutine
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal
from pyro.infer.reparam import NeuTraReparam
from pyro.optim import ClippedAdam

import pyro_inflow as pif
from pyro_inflow.examples.problems import NOISE, Y_OBS, moons_model, quadrature_right_moon


def gradient_table(flow, repeats: int) -> list[dict]:
    """Decode + backward of ``sum(x^2)``, per solver, batch size and dtype, with the median
    per-point decode and relative gradient errors against a float64 dopri5 ``rtol=1e-9``
    reference."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    ref_flow = copy.deepcopy(flow).double()
    for batch in (1, 256):
        z0 = torch.randn(batch, 2, generator=gen, dtype=torch.float64)
        zr = z0.clone().requires_grad_(True)
        ref = ref_flow.decode(zr, rtol=1e-9)
        ref.square().sum().backward()
        ref_grad, ref = zr.grad, ref.detach()
        for dtype in (torch.float32, torch.float64):
            f = flow.to(dtype) if dtype == flow.dtype else copy.deepcopy(flow).to(dtype)
            solvers = [(f"warped_rk4 N={n}", {"method": "warped_rk4", "num_steps": n,
                                              "rtol": 1.0}) for n in (12, 8)]
            solvers += [(f"dopri5 {kind} {rtol:.0e}", {"rtol": rtol, "adjoint": kind == "adjoint"})
                        for rtol in (1e-3, 1e-5) for kind in ("direct", "adjoint")]
            group, steps = [], []
            for name, options in solvers:
                z = z0.to(dtype).requires_grad_(True)

                def step(z=z, options=options, f=f):
                    z.grad = None
                    x, info = f.decode(z, return_info=True, **options)
                    x.square().sum().backward()
                    return x, info

                x, info = step()
                steps.append(step)
                group.append({
                    "batch": batch, "dtype": str(dtype).removeprefix("torch."), "method": name,
                    "forward_nfe": info.nfe,
                    # per point: |x - x_ref| and |g - g_ref| / |g_ref|; the median, since a
                    # few points on the seam between the moons are ill-conditioned for all
                    "decode_err_median": float((x.detach().double() - ref).norm(dim=-1)
                                               .median()),
                    "grad_rel_err_median": float(((z.grad.double() - ref_grad).norm(dim=-1)
                                                  / ref_grad.norm(dim=-1)).median()),
                })
            for row, seconds in zip(group, median_times(steps, repeats)):
                rows.append({**row, "median_s": seconds})
    return rows


def print_gradients(rows: list[dict]) -> None:
    print(f"{'batch':>5}{'dtype':>9}{'method':>22}{'median ms':>11}{'fwd NFE':>9}"
          f"{'decode err':>12}{'grad rel err':>14}  (medians per point)")
    for r in rows:
        print(f"{r['batch']:>5}{r['dtype']:>9}{r['method']:>22}{1e3 * r['median_s']:>11.1f}"
              f"{r['forward_nfe']:>9}{r['decode_err_median']:>12.1e}{r['grad_rel_err_median']:>14.1e}")


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
    return median_times([step], repeats)[0]


def neutra_model(model, y, steps: int, seed: int = 0):
    """Pyro's NeuTra: an AutoIAFNormal guide fitted by SVI on ``model(y)``, then
    NeuTraReparam of the model."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoIAFNormal(model, num_transforms=2, hidden_dim=[32, 32])
    svi = SVI(model, guide, ClippedAdam({"lr": 5e-3, "lrd": 0.1 ** (1 / steps)}),
              Trace_ELBO(num_particles=8, vectorize_particles=True))
    tic = time.perf_counter()
    for _ in range(steps):
        svi.step(y)
    neutra = NeuTraReparam(guide.requires_grad_(False))
    return neutra, poutine.reparam(model, config=lambda _: neutra), time.perf_counter() - tic


def _cpu() -> float:
    t = os.times()  # this process and its finished (joined) worker processes
    return t.user + t.system + t.children_user + t.children_system


def run_nuts(model, y, num_samples, warmup, chains, seed=0, latent=False,
             neutra=None, parallel=None) -> dict:
    pyro.set_rng_seed(seed)
    cpu = _cpu()
    tic = time.perf_counter()
    if neutra is not None:
        mcmc = MCMC(NUTS(model), num_samples=num_samples, warmup_steps=warmup,
                    num_chains=chains, disable_progbar=True)
        mcmc.run(y)
        wall = time.perf_counter() - tic
        shared = mcmc.get_samples(group_by_chain=True)["x_shared_latent"]
        x = neutra.transform_sample(shared)["x"]
    elif latent:
        mcmc = pif.latent_nuts(model, y, num_samples=num_samples, warmup_steps=warmup,
                               num_chains=chains, progress=False, seed=seed,
                               parallel=parallel)
        wall = time.perf_counter() - tic
        x = pif.posterior_samples(mcmc, group_by_chain=True)["x"]
    else:
        mcmc = MCMC(NUTS(model), num_samples=num_samples, warmup_steps=warmup,
                    num_chains=chains, disable_progbar=True)
        mcmc.run(y)
        wall = time.perf_counter() - tic
        x = mcmc.get_samples(group_by_chain=True)["x"]
    cpu = _cpu() - cpu
    x = x.detach().double().numpy()  # (chain, draw, 2)

    def worst(fn):
        return min(float(fn(x[..., i])) for i in range(2))

    ess_bulk = worst(lambda v: az.ess(v, method="bulk"))
    ess_tail = worst(lambda v: az.ess(v, method="tail"))
    per_chain = [min(float(az.ess(x[c, :, i], method="bulk")) for i in range(2))
                 for c in range(chains)]
    rhat = max(float(az.rhat(x[..., i])) for i in range(2))
    div = sum(len(v) for v in mcmc.diagnostics()["divergences"].values())
    processes = (1 if not latent or parallel is False or chains < 2
                 else min(chains, pif.inference._cores()))
    return {"wall_s": wall, "cpu_s": cpu, "processes": processes, "chains": chains,
            "ess_bulk": ess_bulk, "ess_tail": ess_tail,
            "ess_bulk_per_cpu_s": ess_bulk / cpu,
            "ess_bulk_per_s": ess_bulk / wall, "ess_tail_per_s": ess_tail / wall,
            "ess_bulk_single_chain_mean": sum(per_chain) / chains,
            "ess_bulk_single_chain_per_s": sum(per_chain) / wall, "rhat_max": rhat,
            "divergences": div, "mean_x": x.reshape(-1, 2).mean(0).tolist(),
            "frac_x0_gt_0": float((x[..., 0] > 0).mean()),
            "frac_x0_gt_0_per_chain": (x[..., 0] > 0).mean(1).tolist()}


def latent_only(flow, data, n_samp: int, chains: int, steps: int, train_s: float,
                quick: bool) -> None:
    """Latent NUTS on our prior alone, with the quadrature truth (``--latent-only``): the
    chains in worker processes (``latent_nuts``'s default), then one after another in this
    process (the same chains: each seeds ``seed + chain`` in a worker; the sequential run
    draws them from one stream, so its draws differ)."""
    y = torch.tensor(Y_OBS)
    ours = run_nuts(moons_model(flow.prior()), y, n_samp, n_samp, chains, latent=True)
    sequential = run_nuts(moons_model(flow.prior()), y, n_samp, n_samp, chains, latent=True,
                          parallel=False)
    lo, hi = (data.amin(0) - 0.5).tolist(), (data.amax(0) + 0.5).tolist()
    ours["truth_frac_x0_gt_0"] = quadrature_right_moon(
        lambda c: flow.log_prob(c.to(flow.dtype)).double(), lo, hi, n=61 if quick else 241)
    print(f"\n{chains} chains x {n_samp} draws (+{n_samp} warm-up), latent NUTS: "
          f"{ours['wall_s']:.1f} s, ESS bulk {ours['ess_bulk']:.0f} "
          f"({ours['ess_bulk_per_s']:.2f}/s), tail {ours['ess_tail']:.0f} "
          f"({ours['ess_tail_per_s']:.2f}/s), R-hat {ours['rhat_max']:.3f}, divergences "
          f"{ours['divergences']}, P(x0>0) {ours['frac_x0_gt_0']:.3f} (per chain "
          + " ".join(f"{v:.2f}" for v in ours["frac_x0_gt_0_per_chain"])
          + f"), quadrature {ours['truth_frac_x0_gt_0']:.3f}; {ours['processes']} worker "
          f"processes, {ours['cpu_s']:.0f} CPU s")
    print(f"the same, chains one after another in this process: {sequential['wall_s']:.1f} s, "
          f"ESS bulk {sequential['ess_bulk']:.0f} ({sequential['ess_bulk_per_s']:.2f}/s), "
          f"R-hat {sequential['rhat_max']:.3f}, divergences {sequential['divergences']}, "
          f"P(x0>0) {sequential['frac_x0_gt_0']:.3f}, {sequential['cpu_s']:.0f} CPU s")
    write_results("pyro_latent", {"settings": {"train_steps": steps, "num_samples": n_samp,
                                               "warmup": n_samp, "chains": chains,
                                               "y": Y_OBS, "noise": NOISE},
                                  "train_s": train_s, "ours": ours,
                                  "ours_sequential": sequential}, quick)


def main() -> None:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--rtol", type=float, default=None, help="prior tolerance (default: its own)")
    ap.add_argument("--gradients", action="store_true",
                    help="only the gradient-cost table (writes results/pyro_gradients.json)")
    ap.add_argument("--latent-only", action="store_true",
                    help="only latent NUTS on our prior against quadrature (writes "
                         "results/pyro_latent.json)")
    a = ap.parse_args()
    torch.set_num_threads(1)  # NUTS on one point: threads only add overhead
    steps, n_samp, chains = (400, 100, 2) if a.quick else (4000, 500, 4)
    data = pif.datasets.load("moons", n=20_000, seed=1).float()
    held = pif.datasets.load("moons", n=5000, seed=2).float()

    tic = time.perf_counter()
    flow = pif.InflationaryFlow.fit(data, progress=False, steps=steps)
    ours_train = time.perf_counter() - tic
    if a.latent_only:
        latent_only(flow, data, n_samp, chains, steps, ours_train, a.quick)
        return
    grads = gradient_table(flow, repeats=1 if a.quick else 9)
    print_gradients(grads)
    if a.gradients:
        write_results("pyro_gradients", {"train_steps": steps,
                                         "pyro_inflow": str(Path(pif.__file__).parent),
                                         "gradients": grads}, a.quick)
        return

    spline, spline_train = spline_prior(data, steps=steps)
    with torch.no_grad():
        ll_ours = float(flow.log_prob(held).mean())
        ll_spline = float(spline.log_prob(held).mean())

    opts = {} if a.rtol is None else {"rtol": a.rtol}
    ours_prior = flow.prior(**opts)
    y = torch.tensor(Y_OBS)
    ours_model, spline_model = moons_model(ours_prior), moons_model(spline)

    # cost of one potential-energy gradient at a random point
    t_ours = ours_prior.transforms[0]
    cost_ours = gradient_cost(
        lambda z: -(dist.Normal(0.0, 1.0).log_prob(z).sum()
                    + dist.Normal(t_ours.with_cache(0)(z).sum(-1), NOISE).log_prob(y)), 2, 21)
    cost_spline = gradient_cost(
        lambda x: -(spline.log_prob(x) + dist.Normal(x.sum(-1), NOISE).log_prob(y)), 2, 21)

    ours = run_nuts(ours_model, y, n_samp, n_samp, chains, latent=True)
    peer = run_nuts(spline_model, y, n_samp, n_samp, chains)
    neutra, warped, neutra_train = neutra_model(spline_model, y, 300 if a.quick else 3000)
    shared = "x_shared_latent"  # NeuTraReparam names it after the first latent site
    cost_neutra = gradient_cost(
        lambda u: -poutine.trace(poutine.condition(warped, {shared: u})).get_trace(y)
        .log_prob_sum(), 2, 21)
    neu = run_nuts(warped, y, n_samp, n_samp, chains, neutra=neutra)
    lo, hi = (data.amin(0) - 0.5).tolist(), (data.amax(0) + 0.5).tolist()
    n_grid = 61 if a.quick else 241
    ours["truth_frac_x0_gt_0"] = quadrature_right_moon(
        lambda c: flow.log_prob(c.to(flow.dtype)).double(), lo, hi, n=n_grid)
    peer["truth_frac_x0_gt_0"] = quadrature_right_moon(
        lambda c: spline.log_prob(c.float()).double(), lo, hi, n=n_grid)
    neu["truth_frac_x0_gt_0"] = peer["truth_frac_x0_gt_0"]
    rows = [("inflationary flow, NUTS in latent", ll_ours, ours_train, cost_ours, ours),
            ("spline coupling, NUTS on x", ll_spline, spline_train, cost_spline, peer),
            ("spline coupling, NeuTra (IAF)", ll_spline, neutra_train, cost_neutra, neu)]
    print(f"\n{chains} chains x {n_samp} draws (+{n_samp} warm-up) each")
    print(f"{'prior':<34}{'held-out LL':>12}{'grad ms':>8}{'wall s':>8}{'ESS bulk':>9}"
          f"{'tail':>6}{'bulk/s':>8}{'1-chain/s':>10}{'R-hat':>7}{'div':>5}"
          f"{'P(x0>0)':>9}{'truth':>7}")
    for name, ll, _, cost, s in rows:
        print(f"{name:<34}{ll:>12.3f}{1e3 * cost:>8.2f}{s['wall_s']:>8.1f}"
              f"{s['ess_bulk']:>9.0f}{s['ess_tail']:>6.0f}{s['ess_bulk_per_s']:>8.2f}"
              f"{s['ess_bulk_single_chain_per_s']:>10.2f}{s['rhat_max']:>7.2f}"
              f"{s['divergences']:>5}{s['frac_x0_gt_0']:>9.2f}{s['truth_frac_x0_gt_0']:>7.2f}")
        print(f"{'':<34}P(x0>0) per chain: "
              + " ".join(f"{v:.2f}" for v in s["frac_x0_gt_0_per_chain"]))
    print(f"ratio ours/peer ESS bulk per second (all chains): "
          f"{ours['ess_bulk_per_s'] / peer['ess_bulk_per_s']:.2f}")
    out = {
        "settings": {"train_steps": steps, "num_samples": n_samp, "warmup": n_samp,
                     "chains": chains,
                     "prior_options": opts, "y": Y_OBS, "noise": NOISE},
        "gradients": grads,
        "nuts": {"ours": {"heldout_ll": ll_ours, "train_s": ours_train,
                          "grad_s": cost_ours, **ours},
                 "spline": {"heldout_ll": ll_spline, "train_s": spline_train,
                            "grad_s": cost_spline, **peer},
                 "neutra": {"heldout_ll": ll_spline, "guide_train_s": neutra_train,
                            "grad_s": cost_neutra, **neu}},
    }
    write_results("pyro", out, a.quick)


if __name__ == "__main__":
    main()
