"""Training and encoding on each device this machine has: the CPU, and a CUDA GPU if present.

For each device, in one process: train a flow with default settings for ``--steps`` steps
(moons, 20,000 points; digits, 1,500 images, if scikit-learn is installed), then encode
``--points`` held-out points with it (the median of 3 timed calls after one warm-up). Reports
seconds, training samples per second, encoded points per second, and the GPU's speed-up over
the CPU of the same machine; the flows' held-out coverage error says that both devices learn
the same thing.

    python benchmarks/bench_devices.py [--quick] [--steps 600] [--points 100000]

Writes ``benchmarks/results/devices.json`` (the machine's name in ``"machine"``). Run it where a
GPU is; on a CPU-only machine it reports the CPU alone.
"""

from __future__ import annotations

import statistics
import time

import torch
from _harness import parser, write_results

from pyro_inflow import InflationaryFlow, datasets, latent_coverage


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _data(name: str, quick: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    if name == "moons":
        return (datasets.load("moons", n=2000 if quick else 20_000, seed=1).float(),
                datasets.load("moons", n=5000, seed=2).float())
    try:
        x = datasets.load("digits", seed=0).float()
    except ImportError:  # scikit-learn is an optional extra
        return None
    return x[:1500], x[1500:]


def run(name: str, device: torch.device, steps: int, points: int, quick: bool) -> dict | None:
    """One data set on one device: training time, encode throughput, held-out coverage."""
    loaded = _data(name, quick)
    if loaded is None:
        return None
    data, held = loaded
    _sync(device)
    tic = time.perf_counter()
    flow = InflationaryFlow.fit(data, device=device, steps=steps, patience=None,
                                progress=False, recalibrate=False)
    _sync(device)
    train_s = time.perf_counter() - tic
    big = held.repeat((points + len(held) - 1) // len(held), 1)[:points].to(device)
    flow.encode(big[:1000])  # warm-up: the kernel's build, CUDA's context, the solver's grid
    times = []
    for _ in range(3):
        _sync(device)
        tic = time.perf_counter()
        flow.encode(big)
        _sync(device)
        times.append(time.perf_counter() - tic)
    with torch.no_grad():
        z = flow.encode(held)
    return {"data": name, "device": str(device), "steps": steps, "train_s": train_s,
            "samples_per_s": flow.history["samples_seen"][-1] / train_s, "encode_points": points,
            "encode_s": statistics.median(times), "points_per_s": points / statistics.median(times),
            "coverage_error": float(latent_coverage(z)["max_abs_error"])}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="training steps (default 600; 60 "
                   "with --quick)")
    p.add_argument("--points", type=int, default=None, help="points to encode (default "
                   "100000; 5000 with --quick)")
    a = p.parse_args()
    steps = a.steps or (60 if a.quick else 600)
    points = a.points or (5000 if a.quick else 100_000)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    rows = [r for name in ("moons", "digits") for dev in devices
            if (r := run(name, dev, steps, points, a.quick)) is not None]
    print(f"{'data':8} {'device':6} {'train s':>8} {'samples/s':>10} {'encode s':>9} "
          f"{'points/s':>10} {'cov err':>8}")
    for r in rows:
        print(f"{r['data']:8} {r['device']:6} {r['train_s']:8.2f} {r['samples_per_s']:10.0f} "
              f"{r['encode_s']:9.3f} {r['points_per_s']:10.0f} {r['coverage_error']:8.3f}")
    ratios = {}
    for name in ("moons", "digits"):
        by = {r["device"]: r for r in rows if r["data"] == name}
        if "cpu" in by and "cuda" in by:
            ratios[name] = {"train": by["cpu"]["train_s"] / by["cuda"]["train_s"],
                            "encode": by["cpu"]["encode_s"] / by["cuda"]["encode_s"]}
            print(f"{name}: the GPU trains {ratios[name]['train']:.1f}x and encodes "
                  f"{ratios[name]['encode']:.1f}x as fast as this machine's CPU "
                  f"({torch.get_num_threads()} threads)")
    extra = {"gpu": torch.cuda.get_device_name(0)} if torch.cuda.is_available() else {}
    write_results("devices", {**extra, "rows": rows, "gpu_over_cpu": ratios}, a.quick)


if __name__ == "__main__":
    main()
