"""Issue-20 figures: the flow prior's decode and gradient in the compiled kernel, against the
PyTorch path it replaces and against a plain ``MultivariateNormal`` prior inside Pyro's HMC.

A moons flow trained with the default settings (``--quick``: 300 steps; the network, and so
the cost, is the same), 1 torch thread, every timing round-robin in one process:

1. **One decode + backward** (the prior's default ``warped_rk4`` grid, 12 steps, 49
   evaluations) of 1 and of 8 points, float32 and float64: the kernel, the PyTorch path
   (today's autograd through the solver) and their ratio. Accuracy of both in float32 against a
   float64 ``dopri5`` reference at ``rtol = atol = 1e-9`` (backpropagated through the solver),
   over 64 latent points: the largest decode error and the largest gradient error (of
   ``sum(x)``), relative to the largest gradient entry.
2. **Time per HMC leapfrog step** (``pyro.infer.HMC``, 10 fixed leapfrog steps, fixed step
   size, no adaptation) of (a) ``x ~ prior`` (2-D) with ``y ~ N(x0 + x1, 0.3)`` and (b) 8
   groups in a ``pyro.plate``, each a 2-D prior with its own regression on 5 points; the flow
   prior (kernel, and PyTorch path) against a ``MultivariateNormal`` of the training data's
   mean and covariance. Then **the floor** of the flow prior's step: the same step with the
   kernel made free (a stand-in that copies its input: what Pyro's reparametrized site and the
   transform's Python cost), the kernel's own time (forward + adjoint, called directly), and
   the time of the decode's and gradient's multiply-adds at this core's measured peak (a
   float32 1024 x 1024 matrix product on one thread). Free-kernel step + that arithmetic is
   the least a flow prior's step can cost with this network and grid, whatever the code.
3. **Batch size** (the crossing that sets ``MAX_BATCH``): decode time per point with and
   without a gradient, kernel (one thread, as it always is) against the PyTorch path at torch's
   default thread count.

``--log-density`` runs instead:

4. **The data-space log-density + its gradient** (``flow.log_prob`` with the exact trace on the
   same grid, what ``latent_nuts(..., centered=True)`` and ``NUTS`` on the model itself pay) of
   1 and 8 points, kernel against PyTorch path; and the time per HMC leapfrog step of model (b)
   sampled in data space (kernel, PyTorch path) against the same model in the latent (kernel)
   and with the ``MultivariateNormal`` prior.

    python benchmarks/bench_fused.py [--quick] [--log-density]

Prints three tables and writes benchmarks/results/fused.json (``--log-density``: one table and
fused_logdensity.json; ``--quick``: under benchmarks/results/quick/).
"""

from __future__ import annotations

import copy
import time

import pyro
import pyro.distributions as dist
import torch
from _harness import median_times, parser, write_results
from pyro.infer import HMC, MCMC

import pyro_inflow as pif
from pyro_inflow.examples.problems import NOISE, Y_OBS, moons_model
from pyro_inflow.solvers import SOLVERS, fused

GRID = {"method": "warped_rk4", "num_steps": 12, "rtol": 1e9}


def decode_grad(flow, z: torch.Tensor, **solver) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.clone().requires_grad_(True)
    x = flow.decode(z, **solver)
    (g,) = torch.autograd.grad(x.sum(), z)
    return x.detach(), g


def gradient_table(flow, repeats: int) -> list[dict]:
    rows = []
    for dtype in (torch.float32, torch.float64):
        f = flow if dtype == torch.float32 else copy.deepcopy(flow).double()
        for batch in (1, 8):
            z = torch.randn(batch, 2, dtype=dtype, generator=torch.Generator().manual_seed(0))

            def run(use: bool, f=f, z=z) -> None:
                with fused.use_kernel(use):
                    decode_grad(f, z, **GRID)

            t_kernel, t_torch = median_times([lambda: run(True), lambda: run(False)], repeats)
            rows.append({"dtype": str(dtype).split(".")[1], "points": batch,
                         "kernel_ms": 1e3 * t_kernel, "pytorch_ms": 1e3 * t_torch,
                         "speedup": t_torch / t_kernel})
    return rows


def accuracy(flow) -> dict:
    z = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(flow).double()
    x_ref, g_ref = decode_grad(ref, z, method="dopri5", rtol=1e-9, atol=1e-9)
    out = {}
    for use, name in ((True, "kernel"), (False, "pytorch")):
        with fused.use_kernel(use):
            x, g = decode_grad(flow, z.float(), **GRID)
        out[name] = {"decode_max_abs": float((x.double() - x_ref).abs().max()),
                     "grad_max_rel": float((g.double() - g_ref).abs().max()
                                           / g_ref.abs().max())}
    return out


def plate_model(prior, t: torch.Tensor, y: torch.Tensor):
    def model() -> None:
        with pyro.plate("groups", y.shape[1]):
            x = pyro.sample("x", prior)
            with pyro.plate("obs", y.shape[0]):
                mean = x[..., None, :, 0] + x[..., None, :, 1] * t[:, None]  # (..., points, groups)
                pyro.sample("y", dist.Normal(mean, NOISE), obs=y)
    return model


def hmc_step_seconds(model, use: bool, draws: int, args: tuple = ()) -> float:
    """Seconds per leapfrog step of ``HMC`` (10 fixed steps of 0.02, no adaptation) over
    ``draws`` draws, with the kernel (``use``) or the PyTorch path."""
    pyro.set_rng_seed(0)
    kernel = HMC(model, step_size=0.02, num_steps=10, adapt_step_size=False,
                 adapt_mass_matrix=False)
    mcmc = MCMC(kernel, num_samples=draws, warmup_steps=0, disable_progbar=True)
    with fused.use_kernel(use):
        tic = time.perf_counter()
        mcmc.run(*args)
        return (time.perf_counter() - tic) / (10 * draws)


def _free_kernel(lib, name: str, plan, B: int, *tensors) -> None:
    """A stand-in for the kernel's calls that costs (almost) nothing: the solve returns its
    input, the adjoint its cotangent."""
    if "forward" in name:
        tensors[1].copy_(tensors[0])
        tensors[2].zero_()
    else:
        tensors[2].copy_(tensors[1])


def peak_gfma(repeats: int = 15) -> float:
    """This core's float32 multiply-add rate (GFMA/s): a 1024 x 1024 matrix product, one
    thread, median."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    (t,) = median_times([lambda: a @ b], repeats)
    return 1024**3 / t / 1e9


def kernel_cost(flow, points: int, repeats: int) -> tuple[float, int]:
    """The kernel's forward (keeping the adjoint's store) + adjoint for ``points`` points,
    called directly (seconds, median), and the multiply-adds of both (unpadded: the
    network's own)."""
    field = flow.field
    lib = fused._library()
    z = torch.randn(points, flow.dim, generator=torch.Generator().manual_seed(4))
    grid = SOLVERS["warped_rk4"].grid(field, GRID["num_steps"], z)
    plan = fused._plan(field, grid, True, torch.float32)
    x, g = fused._state_rows(z, plan), fused._state_rows(torch.ones_like(z), plan)
    y1, out, err = torch.empty_like(x), torch.empty_like(x), z.new_empty(points)
    store = torch.empty(4 * plan.steps * points * plan.act)
    sfx = fused._suffix(plan)

    def both() -> None:
        fused._run(lib, f"rk4_forward_{sfx}", plan, points, x, y1, err, store)
        fused._run(lib, f"rk4_backward_{sfx}", plan, points, store, g, out)

    (t,) = median_times([both], repeats)
    rows = plan.ints[5:].reshape(-1, 8)
    per_eval = int((rows[:, 0] * rows[:, 2]).sum())  # nin x nout of every unit
    evals = 4 * plan.steps + 1, 4 * plan.steps  # the solve's, and the adjoint's
    return t, per_eval * sum(evals) * points


def leapfrog_table(flow, data: torch.Tensor, rounds: int, draws: int) -> list[dict]:
    mvn = dist.MultivariateNormal(data.mean(0), torch.cov(data.T))
    t = torch.linspace(-1, 1, 5)
    y8 = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    y = torch.tensor(Y_OBS)
    models = {
        "a": (lambda p: moons_model(p), (y,)),
        "b": (lambda p: plate_model(p, t, y8), ()),
    }
    rows = []
    for name, (make, args) in models.items():
        flow_model = pif.reparam_flow_priors(make(flow.prior()))
        mvn_model = make(mvn)

        times: dict[str, list[float]] = {"kernel": [], "pytorch": [], "mvn": [], "free": []}
        for _ in range(rounds):
            times["kernel"].append(hmc_step_seconds(flow_model, True, draws, args))
            times["pytorch"].append(hmc_step_seconds(flow_model, False, draws, args))
            times["mvn"].append(hmc_step_seconds(mvn_model, True, draws, args))
            real, fused._run = fused._run, _free_kernel
            try:
                times["free"].append(hmc_step_seconds(flow_model, True, draws, args))
            finally:
                fused._run = real
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        rows.append({"model": name, "kernel_ms": 1e3 * med["kernel"],
                     "pytorch_ms": 1e3 * med["pytorch"], "mvn_ms": 1e3 * med["mvn"],
                     "free_kernel_ms": 1e3 * med["free"],
                     "kernel_over_mvn": med["kernel"] / med["mvn"],
                     "pytorch_over_mvn": med["pytorch"] / med["mvn"]})
    return rows


def floor_rows(flow, leap: list[dict], repeats: int) -> dict:
    """The least a flow prior's leapfrog step can cost here (see the module docstring)."""
    peak = peak_gfma()
    out = {"peak_gfma": peak, "rows": []}
    for row, points in zip(leap, (1, 8)):
        t, macs = kernel_cost(flow, points, repeats)
        arith = macs / (peak * 1e9)
        floor = row["free_kernel_ms"] / 1e3 + arith
        out["rows"].append({"model": row["model"], "points": points,
                            "kernel_direct_ms": 1e3 * t, "macs": macs,
                            "kernel_gfma": macs / t / 1e9, "arithmetic_ms": 1e3 * arith,
                            "floor_ms": 1e3 * floor,
                            "floor_over_mvn": 1e3 * floor / row["mvn_ms"]})
    return out


def log_density_table(flow, data: torch.Tensor, repeats: int, rounds: int, draws: int
                      ) -> dict:
    """Table 4: the log-density and its gradient, and a data-space leapfrog step of (b)."""
    rows = []
    for dtype in (torch.float32, torch.float64):
        f = flow if dtype == torch.float32 else copy.deepcopy(flow).double()
        for batch in (1, 8):
            x = f.sample(batch, generator=torch.Generator().manual_seed(0))

            def run(use: bool, f=f, x=x) -> None:
                xx = x.clone().requires_grad_(True)
                with fused.use_kernel(use):
                    (g,) = torch.autograd.grad(f.log_prob(xx, trace="exact", **GRID).sum(), xx)

            tk, tp = median_times([lambda: run(True), lambda: run(False)], repeats)
            rows.append({"dtype": str(dtype).split(".")[-1], "points": batch,
                         "kernel_ms": 1e3 * tk, "pytorch_ms": 1e3 * tp, "speedup": tp / tk})
    mvn = dist.MultivariateNormal(data.mean(0), torch.cov(data.T))
    t = torch.linspace(-1, 1, 5)
    y8 = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    models = {"data space": (plate_model(flow.prior(), t, y8), True),
              "data space, PyTorch": (plate_model(flow.prior(), t, y8), False),
              "latent": (pif.reparam_flow_priors(plate_model(flow.prior(), t, y8)), True),
              "MVN": (plate_model(mvn, t, y8), True)}

    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for name, (model, use) in models.items():
            times[name].append(hmc_step_seconds(model, use, draws))
    step = {k: 1e3 * sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"gradients": rows, "leapfrog_ms": step}


def batch_table(flow, threads: int, repeats: int, sizes: tuple[int, ...]) -> list[dict]:
    rows = []
    limit, fused.MAX_BATCH = fused.MAX_BATCH, 10**9  # the kernel at every size, for the curve
    for batch in sizes:
        z = torch.randn(batch, 2, generator=torch.Generator().manual_seed(3))

        def nograd(use: bool, z=z) -> None:
            with fused.use_kernel(use), torch.no_grad():
                flow.decode(z, **GRID)

        def grad(use: bool, z=z) -> None:
            with fused.use_kernel(use):
                decode_grad(flow, z, **GRID)

        torch.set_num_threads(threads)
        ts = median_times([lambda: nograd(True), lambda: nograd(False), lambda: grad(True),
                           lambda: grad(False)], repeats)
        torch.set_num_threads(1)
        rows.append({"points": batch, **{k: 1e6 * v / batch for k, v in zip(
            ("kernel_us", "pytorch_us", "kernel_grad_us", "pytorch_grad_us"), ts)}})
    fused.MAX_BATCH = limit
    return rows


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--log-density", action="store_true", help="only table 4: the data-space "
                   "log-density and its gradient")
    a = p.parse_args()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    steps, repeats, rounds, draws = (300, 5, 3, 10) if a.quick else (4000, 21, 7, 30)
    info = fused.kernel_info()
    print(f"kernel: {info['backend']} ({info['path'] or info['reason']})")
    data = pif.datasets.load("moons", n=20_000, seed=1)
    tic = time.perf_counter()
    flow = pif.InflationaryFlow.fit(data, steps=steps, progress=False).requires_grad_(False)
    print(f"trained moons flow: {steps} steps, {time.perf_counter() - tic:.0f} s")
    if a.log_density:
        out = log_density_table(flow, data, repeats, rounds, draws)
        print("\n4. log-density + gradient, 12-step warped_rk4, exact trace (1 thread; "
              "median ms)")
        print(f"{'dtype':>8}{'points':>7}{'kernel':>9}{'PyTorch':>9}{'ratio':>7}")
        for r in out["gradients"]:
            print(f"{r['dtype']:>8}{r['points']:>7}{r['kernel_ms']:>9.2f}"
                  f"{r['pytorch_ms']:>9.2f}{r['speedup']:>7.1f}")
        print(f"   HMC time per leapfrog step of (b), 8 groups (median ms; 10 steps x {draws} "
              f"draws, {rounds} rounds):")
        for name, ms in out["leapfrog_ms"].items():
            print(f"   {name:>20}: {ms:7.2f}  ({ms / out['leapfrog_ms']['MVN']:.1f}x MVN)")
        write_results("fused_logdensity", {"kernel": info, "train_steps": steps, **out},
                      a.quick)
        return

    grads = gradient_table(flow, repeats)
    print("\n1. one decode + backward, 12-step warped_rk4 (1 thread; median ms)")
    print(f"{'dtype':>8}{'points':>7}{'kernel':>9}{'PyTorch':>9}{'ratio':>7}")
    for r in grads:
        print(f"{r['dtype']:>8}{r['points']:>7}{r['kernel_ms']:>9.2f}{r['pytorch_ms']:>9.2f}"
              f"{r['speedup']:>7.1f}")
    acc = accuracy(flow)
    print("   float32 against float64 dopri5 (rtol 1e-9), 64 points:")
    for name, v in acc.items():
        print(f"   {name:>8}: decode max abs {v['decode_max_abs']:.2e}, gradient max rel "
              f"{v['grad_max_rel']:.2e}")

    leap = leapfrog_table(flow, data, rounds, draws)
    print("\n2. HMC time per leapfrog step (1 thread; median ms; 10 steps x "
          f"{draws} draws, {rounds} rounds)")
    print(f"{'model':>6}{'kernel':>9}{'PyTorch':>9}{'MVN':>8}{'kernel/MVN':>12}"
          f"{'PyTorch/MVN':>13}")
    for r in leap:
        print(f"{r['model']:>6}{r['kernel_ms']:>9.2f}{r['pytorch_ms']:>9.2f}{r['mvn_ms']:>8.2f}"
              f"{r['kernel_over_mvn']:>12.2f}{r['pytorch_over_mvn']:>13.2f}")
    floor = floor_rows(flow, leap, repeats * 5)
    print(f"   the floor (peak {floor['peak_gfma']:.0f} GFMA/s, float32 matmul, 1 thread): "
          "step with a free kernel + the decode's and gradient's multiply-adds at that peak")
    print(f"{'model':>6}{'free kernel':>13}{'kernel':>9}{'GFMA/s':>8}{'arith.':>8}{'floor':>8}"
          f"{'floor/MVN':>11}")
    for r, f in zip(leap, floor["rows"]):
        print(f"{r['model']:>6}{r['free_kernel_ms']:>13.2f}{f['kernel_direct_ms']:>9.2f}"
              f"{f['kernel_gfma']:>8.1f}{f['arithmetic_ms']:>8.2f}{f['floor_ms']:>8.2f}"
              f"{f['floor_over_mvn']:>11.2f}")

    sizes = (1, 8, 64, 256, 1024) if a.quick else (1, 8, 32, 64, 128, 256, 512, 1024, 4096)
    batches = batch_table(flow, threads, max(3, repeats // 4), sizes)
    print(f"\n3. decode cost per point by batch size (us; PyTorch path at {threads} threads)")
    print(f"{'points':>7}{'kernel':>9}{'PyTorch':>9}{'kernel+grad':>13}{'PyTorch+grad':>14}")
    for r in batches:
        print(f"{r['points']:>7}{r['kernel_us']:>9.1f}{r['pytorch_us']:>9.1f}"
              f"{r['kernel_grad_us']:>13.1f}{r['pytorch_grad_us']:>14.1f}")
    write_results("fused", {"kernel": info, "train_steps": steps, "gradients": grads,
                            "accuracy": acc, "leapfrog": leap, "floor": floor,
                            "batch": batches,
                            "torch_threads_batch_table": threads}, a.quick)


if __name__ == "__main__":
    main()
