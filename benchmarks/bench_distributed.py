"""Issue 5, question 6: data-parallel training with torchrun (gloo on loopback) vs one process.

Trains the same flow (moons, 20,000 points, default network, ``--steps`` steps of a global
batch of 512) once in one process and once with ``torchrun --nproc-per-node P`` for each P
asked, then reports wall time, samples per second, the largest weight difference from the
one-process run, and the RMS latent difference on 2,000 unseen points (dopri5, 1e-6).

    python benchmarks/bench_distributed.py [--quick] [--steps 1000] [--procs 2]

Writes ``benchmarks/results/distributed.json``. On a machine with fewer cores than processes
the processes only share the cores: the point there is the agreement, not the speed.
``--quick``: 100 steps, written to ``benchmarks/results/quick/``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _harness import parser, write_results

from pyro_inflow import InflationaryFlow, datasets


def _train(folder: Path, procs: int, steps: int, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    args = ["-m", "pyro_inflow", "train", "data.npy", "--steps", str(steps), "--quiet",
            "--out", f"p{procs}.flow"]
    if procs > 1:
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
                *args]
    tic = time.perf_counter()
    run = subprocess.run([sys.executable, *args], cwd=folder, env=env, capture_output=True,
                         text=True)
    wall = time.perf_counter() - tic
    if run.returncode:
        raise SystemExit(f"training on {procs} process(es) failed:\n{run.stderr[-3000:]}")
    return wall


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="default 1000; 100 with --quick")
    p.add_argument("--procs", type=int, nargs="+", default=[2])
    a = p.parse_args()
    if a.steps is None:
        a.steps = 100 if a.quick else 1000
    cores = os.cpu_count() or 1
    held = datasets.load("moons", n=2000, seed=2).double()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        np.save(folder / "data.npy", datasets.load("moons", n=20_000, seed=1).numpy())
        for procs in [1, *a.procs]:
            threads = max(1, cores // procs)
            wall = _train(folder, procs, a.steps, threads)
            flow = InflationaryFlow.load(folder / f"p{procs}.flow")
            rows.append({"processes": procs, "threads_each": threads, "wall_s": wall,
                         "samples_per_s": a.steps * 512 / wall, "flow": flow})
        ref = rows[0]["flow"].double()
        with torch.no_grad():
            z_ref = ref.encode(held, rtol=1e-6, atol=1e-6)
        for row in rows:
            flow = row.pop("flow").double()
            diffs = [(v - ref.denoiser.state_dict()[k]).abs().max().item()
                     for k, v in flow.denoiser.state_dict().items()]
            with torch.no_grad():
                z = flow.encode(held, rtol=1e-6, atol=1e-6)
            row["max_weight_diff"] = max(diffs)
            row["latent_rms_diff"] = float((z - z_ref).square().mean().sqrt())
    print(f"data-parallel training, moons 20,000 points, {a.steps} steps x 512 (global batch), "
          f"{cores} cores, torch {torch.__version__}")
    print(f"{'processes':>9} {'threads':>7} {'wall s':>8} {'samples/s':>10} "
          f"{'max |dW|':>9} {'latent rms diff':>15}")
    for r in rows:
        print(f"{r['processes']:>9} {r['threads_each']:>7} {r['wall_s']:>8.1f} "
              f"{r['samples_per_s']:>10,.0f} {r['max_weight_diff']:>9.1e} "
              f"{r['latent_rms_diff']:>15.1e}")
    write_results("distributed", {"steps": a.steps, "batch_size": 512, "rows": rows}, a.quick)


if __name__ == "__main__":
    main()
