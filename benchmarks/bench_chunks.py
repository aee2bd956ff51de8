"""Issue-22 figures: the flow's maps on big inputs, chunked against one batch, and the CLI's
streaming encode.

Every measurement runs in a fresh process, so that its peak resident memory (``ru_maxrss``)
is its own. The flows of parts 1 and 2 have the default architecture and dtype
(residual MLP 128 x 3, float32; 20 training steps on correlated Gaussian data of width D),
and their rows are standard-normal.

1. **Rows per second and peak memory** of ``encode``, ``decode`` and ``log_prob`` (2-D:
   10^4 and 10^5 rows, encode also 10^6; 64-D: 10^4, log_prob 10^3, encode also 10^5), with
   the default chunks (``batch_size=8192``) and in one batch, on the fixed grid
   (``warped_rk4``, 12 steps: the cost per row does not depend on the weights; ``log_prob``
   with the log-determinant, exact trace in 2-D, 16 Hutchinson probes in 64-D). 10^7 rows
   were not run: at the flat rows per second measured they take 20 minutes (2-D) to hours
   (64-D) on 2 cores, with the same chunked memory.
2. **Chunk size**: 2-D encode of 10^5 rows for ``batch_size`` from 512 to 32,768 and one
   batch: where the default sits on the speed and memory curves.
3. **The CLI**: ``pyro-inflow encode`` of 3,000,000 moons rows with a flow trained with the
   default settings and the CLI's defaults (``dopri5``, rtol 1e-5, chunks of 8,192) under
   ``/usr/bin/time -v``: peak memory, wall time, rows per second; and its first 100,000
   latents against one batch of those rows (adaptive steps: within tolerance).

    python benchmarks/bench_chunks.py [--quick]

Writes ``benchmarks/results/chunks.json`` (``--quick``: 10x fewer rows, to
``benchmarks/results/quick/``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _harness import parser, write_results

GRID = {"method": "warped_rk4", "num_steps": 12}

CHILD = r"""
import json, resource, sys, time, torch
from pyro_inflow import InflationaryFlow
torch.manual_seed(0)
spec = json.loads(sys.argv[1])
flow = InflationaryFlow.load(spec["flow"])
n, D, batch = spec["n"], flow.dim, spec["batch"]
x = torch.randn(n, D if spec["op"] != "decode" else flow.latent_dim)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
tic = time.perf_counter()
with torch.no_grad():
    if spec["op"] == "encode":
        flow.encode(x, batch_size=batch, **spec["solver"])
    elif spec["op"] == "decode":
        flow.decode(x, batch_size=batch, **spec["solver"])
    else:
        flow.log_prob(x, batch_size=batch, **spec["solver"])
seconds = time.perf_counter() - tic
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "rows_per_s": n / seconds, "peak_mib": peak,
                  "input_and_imports_mib": base}))
"""


def child(spec: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_flows(folder: Path) -> dict[int, str]:
    import torch

    from pyro_inflow import InflationaryFlow

    paths = {}
    for D in (2, 64):
        data = torch.randn(4000, D) @ torch.randn(D, D) / D**0.5
        flow = InflationaryFlow.fit(data, steps=20, progress=False)
        paths[D] = str(folder / f"flow{D}.flow")
        flow.save(paths[D])
    return paths


def throughput_table(flows: dict[int, str], scale: int) -> list[dict]:
    rows = []
    plan = [(2, "encode", 10_000), (2, "decode", 10_000), (2, "log_prob", 10_000),
            (2, "encode", 100_000), (2, "decode", 100_000), (2, "log_prob", 100_000),
            (2, "encode", 1_000_000),
            (64, "encode", 10_000), (64, "decode", 10_000), (64, "log_prob", 1_000),
            (64, "encode", 100_000)]
    for D, op, n in plan:
        n //= scale
        for batch in (8192, None):
            r = child({"flow": flows[D], "n": n, "op": op, "batch": batch, "solver": GRID})
            rows.append({"D": D, "n": n, "op": op, "batch_size": batch, **r})
            print(f"D={D:3d} n={n:>9,} {op:9s} batch={str(batch):>5s}  "
                  f"{r['rows_per_s']:>10,.0f} rows/s  peak {r['peak_mib']:8.0f} MiB", flush=True)
    return rows


def chunk_curve(flows: dict[int, str], scale: int) -> list[dict]:
    rows = []
    n = 100_000 // scale
    for batch in (512, 2048, 8192, 32768, None):
        r = child({"flow": flows[2], "n": n, "op": "encode", "batch": batch, "solver": GRID})
        rows.append({"n": n, "batch_size": batch, **r})
        print(f"encode 2-D n={n:,} batch={str(batch):>6s}  {r['rows_per_s']:>10,.0f} rows/s  "
              f"peak {r['peak_mib']:8.0f} MiB", flush=True)
    return rows


def cli_run(folder: Path, scale: int) -> dict:
    import numpy as np
    import torch

    from pyro_inflow import InflationaryFlow, datasets

    flow = str(folder / "moons.flow")
    tic = time.perf_counter()
    InflationaryFlow.fit(datasets.load("moons", n=20_000, seed=0), progress=False).save(flow)
    print(f"trained the default moons flow in {time.perf_counter() - tic:.0f} s", flush=True)
    n = 3_000_000 // scale
    data = folder / "big.npy"
    np.save(data, datasets.load("moons", n=n, seed=1).numpy())
    out = folder / "z.npy"
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "pyro_inflow", "encode", flow,
           str(data), "--out", str(out)]
    tic = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - tic
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr)[1])
    z = np.load(out)
    k = min(n, 100_000)
    one = InflationaryFlow.load(flow).encode(torch.from_numpy(np.load(data)[:k]).float(),
                                             batch_size=None)
    diff = float(np.abs(z[:k] - one.numpy()).max())
    result = {"n": n, "seconds": seconds, "rows_per_s": n / seconds,
              "peak_mib": peak_kib / 1024, "max_abs_diff_vs_one_batch_first_rows": diff,
              "rows_compared": k, "progress_reported": "rows/s" in run.stderr,
              "report": [line for line in run.stderr.splitlines()
                         if line.startswith(("encoded", "wrote"))]}
    print(f"pyro-inflow encode {n:,} rows: {seconds:.1f} s, {n / seconds:,.0f} rows/s, peak "
          f"{peak_kib / 1024:.0f} MiB; first {k:,} latents vs one batch: max |diff| {diff:.2e}",
          flush=True)
    return result


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    scale = 10 if args.quick else 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        flows = make_flows(folder)
        payload = {"throughput": throughput_table(flows, scale),
                   "chunk_size": chunk_curve(flows, scale),
                   "cli": cli_run(folder, scale)}
    write_results("chunks", payload, args.quick)


if __name__ == "__main__":
    main()
