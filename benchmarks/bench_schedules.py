"""Issue 21, item 3: the paper's PR-reducing schedule (constant inflation gap) against ours.

Two PR-reducing schedules, trained side by side on the same data with the same settings:

* ``ours`` (the default): kept directions inflate at ``1 + g = 2``, compressed ones at
  ``1 + g = 1 - d / (D - d)`` (``sum(g) = 0``; the compressed noise shrinks when ``d > D/2``);
* ``paper``: the constant inflation gap of the paper's experiments, kept ``1 + g = 2``,
  compressed ``1 + g = 0.98`` (``inflation_gap=0.02``: the compressed noise still grows, only
  slower).

On the 3-D toys (s_curve and swiss_roll to d = 2; 20,000 training points, default training) and
the 64-D digits (d = 4, 8, 16; 1,500 training images, early stopping ``patience=4``), measured
on held-out points: the latent coverage error (chi-square(d) regions of the kept
coordinates, held-out points plus the ``t = 0`` noise, largest ``|coverage - level|`` of five
levels), the full-state roundtrip ``|x - decode_full(encode_full(x))|`` (RMS), the zero-fill
reconstruction ``|x - decode(encode(x))|`` (RMS) against PCA to the same d, and the sample
quality of generation with three fills of the compressed coordinates: zeros, ``N(0, 1)`` (the
full-rank model's end state) and ``N(0, eps^2)`` with ``eps`` the standard deviation of the
training points' own end state in the compressed coordinates (the "end-state variance of the
training data"), by the energy distance to held-out points (smaller is better; two samples of
the data itself give its noise level). Pictures: ``benchmarks/results/schedules.png``.

    python benchmarks/bench_schedules.py [--quick]

Needs scikit-learn for the digits. Writes ``benchmarks/results/schedules.json``.
"""

from __future__ import annotations

import time

import matplotlib
import torch
from _harness import parser, results_dir, write_results

from pyro_inflow import InflationaryFlow, datasets
from pyro_inflow.calibration import latent_coverage

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SCHEDULES = {"ours": {}, "paper": {"inflation_gap": 0.02}}
SOLVER = {"method": "warped_rk4", "num_steps": 12}


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """The energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` of two samples."""
    x, y = x.double(), y.double()
    xy = torch.cdist(x, y).mean()
    xx, yy = torch.cdist(x, x).mean(), torch.cdist(y, y).mean()
    return float(2 * xy - xx - yy)


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """RMS of ``|a - b|`` over points (per point, the Euclidean norm)."""
    return float((a.double() - b.double()).norm(dim=-1).square().mean().sqrt())


def pca_reconstruction(train: torch.Tensor, held: torch.Tensor, d: int) -> float:
    mean = train.double().mean(0)
    _, _, V = torch.linalg.svd(train.double() - mean, full_matrices=False)
    back = mean + ((held.double() - mean) @ V[:d].T) @ V[:d]
    return rms(held, back)


def evaluate(flow: InflationaryFlow, train: torch.Tensor, held: torch.Tensor,
             n_samples: int, seed: int) -> dict:
    d = flow.latent_dim
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = flow.encode(flow.add_t0_noise(held, generator=gen), **SOLVER)
        w = flow.encode_full(held, **SOLVER)
        roundtrip = rms(held, flow.decode_full(w, **SOLVER))
        recon = rms(held, flow.decode(flow.encode(held, **SOLVER), **SOLVER))
        end = flow.encode_full(train[:2000], **SOLVER)[:, d:]
        eps = float(end.std())
        samples = {name: flow.sample(n_samples, seed=seed, fill=fill, **SOLVER)
                   for name, fill in (("zeros", "zeros"), ("normal", "normal"),
                                      ("eps", eps))}
    ref = held[:n_samples]
    return {"coverage_error": latent_coverage(z)["max_abs_error"],
            "roundtrip_rms": roundtrip, "reconstruction_rms": recon,
            "end_state_sd": eps,
            "energy": {k: energy_distance(v, ref) for k, v in samples.items()},
            "_samples": samples}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    a = p.parse_args()
    cases = [("s_curve", 2), ("swiss_roll", 2)] + [("digits", d) for d in (4, 8, 16)]
    if a.quick:
        cases = [("s_curve", 2), ("digits", 8)]
    rows, pictures = [], {}
    for name, d in cases:
        if name == "digits":
            x = datasets.load("digits", seed=0)
            train, held = x[:1500], x[1500:]
            settings = {"patience": 4}
        else:
            train = datasets.load(name, n=20_000, seed=0)
            held = datasets.load(name, n=2_000, seed=1)
            settings = {}
        if a.quick:
            settings["steps"] = 300
        n_samples = min(2000, len(held))
        # the data's own noise level: another sample of the data (digits: training images)
        other = (train[:n_samples] if name == "digits"
                 else datasets.load(name, n=n_samples, seed=2))
        floor = energy_distance(other, held[:n_samples])
        pca = pca_reconstruction(train, held, d)
        for sched, options in SCHEDULES.items():
            tic = time.perf_counter()
            flow = InflationaryFlow.fit(train, schedule="prr", dims_to_keep=d, progress=False,
                                        **settings, **options)
            seconds = time.perf_counter() - tic
            res = evaluate(flow, train, held, n_samples, seed=0)
            pictures[(name, d, sched)] = (res.pop("_samples"), held[:n_samples])
            row = {"data": name, "d": d, "schedule": sched, "t_max": flow.schedule.t_max,
                   "train_s": seconds, "pca_rms": pca, "data_energy": floor, **res}
            rows.append(row)
            e = row["energy"]
            print(f"{name:>10} d={d:<2} {sched:>5}: T {row['t_max']:.1f}, coverage err "
                  f"{row['coverage_error']:.3f}, roundtrip {row['roundtrip_rms']:.2e}, "
                  f"zero-fill {row['reconstruction_rms']:.3f} (PCA {pca:.3f}), end-state sd "
                  f"{row['end_state_sd']:.3f}, energy zeros {e['zeros']:.4f} normal "
                  f"{e['normal']:.4f} eps {e['eps']:.4f} (data {floor:.4f}), {seconds:.0f} s",
                  flush=True)
    print("\n| data | d | schedule | T | coverage err | full-state roundtrip | zero-fill "
          "reconstruction (PCA) | end-state sd | energy: zeros / N(0,1) / N(0,eps^2) (data) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        e = r["energy"]
        print(f"| {r['data']} | {r['d']} | {r['schedule']} | {r['t_max']:.1f} | "
              f"{r['coverage_error']:.3f} | {r['roundtrip_rms']:.1e} | "
              f"{r['reconstruction_rms']:.3f} ({r['pca_rms']:.3f}) | {r['end_state_sd']:.3f} | "
              f"{e['zeros']:.4f} / {e['normal']:.4f} / {e['eps']:.4f} ({r['data_energy']:.4f}) |")
    _picture(pictures, results_dir(a.quick) / "schedules.png")
    write_results("schedules", {"rows": rows}, a.quick)


def _picture(pictures: dict, path) -> None:
    toys = [k for k in pictures if k[0] != "digits"]
    digits = [k for k in pictures if k[0] == "digits" and k[1] == 8]
    rows = len({k[0] for k in toys}) + (2 if digits else 0)
    fig, axes = plt.subplots(rows, 6, figsize=(15, 2.6 * rows), squeeze=False)
    r = 0
    for name in dict.fromkeys(k[0] for k in toys):
        col = 0
        for sched in SCHEDULES:
            samples, held = pictures[(name, 2, sched)]
            for fill in ("zeros", "normal", "eps"):
                ax = axes[r, col]
                ax.scatter(held[:, 0], held[:, 2], s=1, color="0.8")
                s = samples[fill]
                ax.scatter(s[:, 0], s[:, 2], s=1, color="C0" if sched == "ours" else "C1")
                ax.set_title(f"{name}, {sched}, fill {fill}", fontsize=8)
                ax.set_xticks([]), ax.set_yticks([])
                col += 1
        r += 1
    for key in digits:
        samples, _ = pictures[key]
        for col, fill in enumerate(("zeros", "normal", "eps")):
            for k in range(2):
                ax = axes[r + k, col + (3 if key[2] == "paper" else 0)]
                im = samples[fill][4 * k:4 * k + 4].clamp(0, 1).reshape(4, 8, 8)
                ax.imshow(torch.cat(list(im), 1), cmap="gray_r", vmin=0, vmax=1)
                ax.set_xticks([]), ax.set_yticks([])
                if k == 0:
                    ax.set_title(f"digits d=8, {key[2]}, fill {fill}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
