"""The ``pyro-inflow`` command. Files are NumPy ``.npy`` arrays of shape ``(n, D)`` or ``(n, d)``.

Every command exits 0 on success; a user error prints one line, ``pyro-inflow: error: ...``, on
stderr and exits 2 (1 for a numerical failure), with no traceback, and no output file is ever
left half written. ``encode``, ``decode``, ``log-prob`` and ``sample`` stream: the input is
checked in one pass before any work (a NaN is reported with its row), then read, solved and
written ``--batch-size`` rows at a time with a progress bar, into a temporary file renamed onto
the output at the end; Ctrl-C or ``SIGTERM`` stops within a chunk and leaves no output (exit
130).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from . import _io
from ._chunks import DEFAULT_BATCH, merge_infos
from ._progress import tqdm
from ._stream import RowFile, RowWriter, check_finite_rows, interruptible
from ._validation import check_data
from .flow import FILLS, InflationaryFlow
from .solvers import METHODS, SolveInfo, SolverError
from .solvers.fused import MAX_BATCH, use_kernel
from .training import TrainingDiverged, init_distributed

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + message
        self.exit(2, f"pyro-inflow: error: {message}\n")


def _load_npy(path: str, name: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{name}: {path}: no such file")
    try:
        arr = np.load(p, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e) or "Object arrays" in str(e):
            raise ValueError(f"{name}: {path} holds pickled Python objects, which are refused; "
                             f"save a plain float array with numpy.save") from e
        raise ValueError(f"{name}: {path} is not a readable .npy file ({e})") from e
    except (OSError, EOFError) as e:
        raise ValueError(f"{name}: {path} is not a readable .npy file ({e})") from e
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{name}: {path} is an .npz archive; expected a single .npy array")
    return arr


def _check_out(*paths: str | None) -> None:
    """Fail before any work if an output's folder is missing."""
    for path in paths:
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise FileNotFoundError(f"{path}: folder {Path(path).parent} does not exist")


def _solver_args(p: argparse.ArgumentParser, rows: bool = True) -> None:
    p.add_argument("--rtol", type=float, default=None,
                   help="relative tolerance (default 1e-5; for warped_rk4 the error budget, "
                        "default 5e-2)")
    p.add_argument("--atol", type=float, default=None, help="absolute tolerance (default rtol)")
    p.add_argument("--method", default="dopri5", choices=METHODS,
                   help="solver (default dopri5; warped_rk4 is the fast fixed grid)")
    p.add_argument("--num-steps", type=int, default=None,
                   help="steps of warped_rk4 (default 12)")
    p.add_argument("--float64", action="store_true", help="compute in float64")
    if rows:
        p.add_argument("--batch-size", type=_positive, default=DEFAULT_BATCH, metavar="ROWS",
                       help=f"rows read, solved and written at a time (default "
                            f"{DEFAULT_BATCH}); memory grows with it, speed hardly does")
        p.add_argument("--quiet", action="store_true", help="no progress bar")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _solver(a: argparse.Namespace) -> dict:
    return {"rtol": a.rtol, "atol": a.atol, "method": a.method, "num_steps": a.num_steps}


def _flow(a: argparse.Namespace) -> InflationaryFlow:
    flow = InflationaryFlow.load(a.flow)
    return flow.double() if getattr(a, "float64", False) else flow


def _report_solve(info: SolveInfo, what: str, n: int, seconds: float) -> None:
    err = "" if info.error is None else f", estimated error {info.error:.1e}"
    print(f"{what} {n:,} points: {info.nfe} evaluations ({info.method}, rtol {info.rtol:g}"
          f"{err}), {seconds:.2f} s", file=sys.stderr)


def _fill_arg(text: str) -> str | float:
    """``--fill``: a name in FILLS or a standard deviation."""
    if text in FILLS:
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected one of {FILLS} or a number >= 0, got "
                                         f"{text!r}")
    return value


def cmd_train(a: argparse.Namespace) -> None:
    x = check_data(_load_npy(a.data, "DATA"), "DATA")
    if a.out == a.data:
        raise ValueError("--out: would overwrite the training data")
    settings = {k: v for k, v in {
        "schedule": a.schedule, "dims_to_keep": a.dims_to_keep, "seed": a.seed,
        "steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "t_max": a.t_max,
        "hidden": a.hidden, "depth": a.depth, "patience": a.patience}.items() if v is not None}
    if settings.get("patience") == 0:
        settings["patience"] = None  # --patience 0: no early stopping
    if a.no_recalibrate:
        settings["recalibrate"] = False
    ckpt = a.checkpoint or f"{a.out}.ckpt"
    rank, world = init_distributed()  # torchrun --nproc-per-node N: data-parallel training
    tic = time.perf_counter()
    try:
        flow = InflationaryFlow.fit(x, checkpoint=ckpt, checkpoint_every=a.checkpoint_every,
                                    resume=a.resume, progress=not a.quiet, device=a.device,
                                    **settings)
    except TrainingDiverged as e:
        raise FloatingPointError(
            f"training diverged at step {e.step + 1} (non-finite loss or gradient); the last "
            f"good weights (step {e.step}) are in the checkpoint {ckpt}; train again with a "
            f"lower --lr") from None
    except KeyboardInterrupt:
        if rank == 0:
            print(f"pyro-inflow: interrupted; checkpoint saved to {ckpt}; continue with the "
                  f"same command and --resume {ckpt}", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    if rank != 0:
        return
    if a.checkpoint is None and Path(ckpt).exists():
        Path(ckpt).unlink()
    h = flow.history
    flow.save(a.out, metadata={"trained_on": str(a.data), "settings": settings,
                               "history": {k: v[-1:] if isinstance(v, list) else v
                                           for k, v in h.items()}})
    on = f" on {world} processes" if world > 1 else ""
    stopped, val = "", h["val_loss"][-1]
    if "best_step" in h:
        stopped = f" (early stopping: the weights of step {h['best_step']})"
        val = h["val_loss"][h["step"].index(h["best_step"])]
    print(f"trained a {flow.schedule.schedule.upper()} flow (D={flow.dim}, d={flow.latent_dim}) "
          f"in {time.perf_counter() - tic:.1f} s{on}, {h['samples_seen'][-1]:,} samples seen, "
          f"validation loss {val:.4f}{stopped}; wrote {a.out}")
    if flow.certificate is not None:
        from .calibration.certificate import certificate_table

        print(f"held-out calibration of the {flow.certificate['n']:,} points kept out of "
              f"training (stored in {a.out}):\n{certificate_table(flow.certificate)}")


def _stream(a: argparse.Namespace, what: str, n: int, chunks: Iterator[torch.Tensor],
            compute: Callable[[torch.Tensor], tuple[torch.Tensor, SolveInfo]]) -> None:
    """Solve ``chunks`` (``n`` rows in all) with ``compute`` and write the results to
    ``a.out`` as they come, with a progress bar; an interruption writes nothing."""
    infos: list[SolveInfo] = []
    tic = time.perf_counter()
    bar = tqdm(total=n, unit=" rows", unit_scale=True, desc=a.command, disable=a.quiet,
               leave=False, file=sys.stderr)
    # the chunks take the route one batch of n rows would (the compiled kernel only up to
    # MAX_BATCH rows in all), so a fixed grid writes the numbers of one batch
    route = use_kernel(False) if n > MAX_BATCH else contextlib.nullcontext()
    with interruptible(), RowWriter(a.out, n) as out, bar, route, torch.no_grad():
        try:
            for chunk in chunks:
                result, info = compute(chunk)
                out.write(result.cpu().numpy())
                infos.append(info)
                bar.update(len(chunk))
            out.commit()
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"{what} stopped after {out.rows:,} of {n:,} rows; "
                                    f"{a.out} was not written") from None
    seconds = time.perf_counter() - tic
    _report_solve(merge_infos(infos), what, n, seconds)
    print(f"wrote {a.out} ({n / max(seconds, 1e-9):,.0f} rows/s)", file=sys.stderr)


def _rows(a: argparse.Namespace, path: str, name: str, dim: int,
          dtype: torch.dtype) -> tuple[int, Iterator[torch.Tensor]]:
    """Rows of ``path`` ``(n, dim)``, checked in one streaming pass before any work, as
    ``a.batch_size`` chunks in the flow's ``dtype``."""
    rows = RowFile(path, name, dim)
    check_finite_rows(rows, name)
    return len(rows), (torch.from_numpy(block).to(dtype) for block in rows.blocks(a.batch_size))


def cmd_encode(a: argparse.Namespace) -> None:
    flow = _flow(a)
    n, chunks = _rows(a, a.data, "DATA", flow.dim, flow.dtype)
    _stream(a, "encoded", n, chunks,
            lambda x: flow.encode(x, return_info=True, batch_size=None, **_solver(a)))


def cmd_decode(a: argparse.Namespace) -> None:
    flow = _flow(a)
    n, chunks = _rows(a, a.latents, "Z", flow.latent_dim, flow.dtype)
    gen = torch.Generator().manual_seed(a.seed)
    _stream(a, "decoded", n, chunks,
            lambda z: flow.decode(z, fill=a.fill, generator=gen, return_info=True,
                                  batch_size=None, **_solver(a)))


def cmd_sample(a: argparse.Namespace) -> None:
    flow = _flow(a)
    if a.n < 1:
        raise ValueError(f"-n: expected a positive number of samples, got {a.n}")
    blocks = flow.latent_blocks(a.n, seed=a.seed)  # the blocks flow.sample(n, seed) draws
    _stream(a, "sampled", a.n, blocks,
            lambda w: flow.decode_full(w, return_info=True, batch_size=a.batch_size,
                                       **_solver(a)))


def cmd_log_prob(a: argparse.Namespace) -> None:
    flow = _flow(a)
    flow.require_density("log-prob")
    n, chunks = _rows(a, a.data, "DATA", flow.dim, flow.dtype)
    _stream(a, "log-density of", n, chunks,
            lambda x: flow.log_prob(x, trace=a.trace, return_info=True, batch_size=None,
                                    **_solver(a)))


def cmd_calibrate(a: argparse.Namespace) -> None:
    import json

    from .calibration import (  # plots and ArviZ-free reports: loaded when asked for
        LEVELS,
        calibration_table,
        certificate_table,
        flow_calibration,
        identifiability,
        plot_calibration,
        report_json,
    )

    flow = _flow(a)
    x = check_data(_load_npy(a.heldout, "HELDOUT"), "HELDOUT", dim=flow.dim)
    second = None
    if a.compare is not None:
        second = InflationaryFlow.load(a.compare)
        if (second.dim, second.latent_dim) != (flow.dim, flow.latent_dim):
            raise ValueError(f"--compare: {a.compare} maps {second.dim}->{second.latent_dim} "
                             f"dimensions, {a.flow} maps {flow.dim}->{flow.latent_dim}")
        second = second.to(flow.dtype)
    solver = {k: v for k, v in _solver(a).items() if v is not None}
    out = Path(a.out)
    out.mkdir(exist_ok=True)
    print(f"pyro-inflow calibrate: {a.flow} ({flow.dim}-D data, {flow.latent_dim}-D latent, "
          f"{flow.schedule.schedule.upper()}) on {len(x):,} held-out points from {a.heldout}",
          file=sys.stderr)
    tic = time.perf_counter()
    report = flow_calibration(flow, x, a.levels or LEVELS, **solver)
    if second is not None:
        report["identifiability"] = identifiability(flow, second, x, **solver)
    report["seconds"] = time.perf_counter() - tic
    if flow.certificate is not None:
        print(f"stored at training, on the {flow.certificate['n']:,} points kept out of "
              f"training:\n{certificate_table(flow.certificate)}\n\non {a.heldout}:")
        report["certificate"] = flow.certificate
    else:
        print(f"{a.flow} carries no held-out certificate (made by an older pyro_inflow, or "
              f"not by fit); on {a.heldout}:")
    print(calibration_table(report))
    files = plot_calibration(report, out, x=x)
    data = {"flow": str(a.flow), "heldout": str(a.heldout), **report_json(report)}
    _io.atomic_write(out / "report.json", lambda f: f.write(json.dumps(data, indent=2).encode()))
    print(f"wrote {', '.join(str(p) for p in [out / 'report.json', *files])}", file=sys.stderr)


def cmd_demo(a: argparse.Namespace) -> None:
    from .examples.demo import run_demo

    # NUTS decodes one point per gradient, where a second thread only adds overhead
    run_demo(out=Path(a.out), n=a.n, steps=a.steps, seed=a.seed, progress=not a.quiet,
             n_heldout=a.heldout, draws=a.draws, svi_steps=a.svi_steps, nuts_threads=1)


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pyro-inflow", description="Inflationary flows: learn, encode, decode, "
                "sample and evaluate calibrated priors for Pyro.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    d = sub.add_parser("demo", help="train on moons, calibrate, NUTS and SVI with the flow as "
                       "a prior; tables and plots")
    d.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    d.add_argument("--n", type=int, default=20_000, help="training points (default 20000)")
    d.add_argument("--steps", type=int, default=4000, help="training steps (default 4000)")
    d.add_argument("--heldout", type=int, default=5000, help="held-out points (default 5000)")
    d.add_argument("--draws", type=int, default=150,
                   help="NUTS draws per chain, 4 chains, as many warm-up steps (default 150)")
    d.add_argument("--svi-steps", type=int, default=1000, help="SVI steps (default 1000)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="learn a flow from DATA.npy (n, D); data-parallel when "
                                     "launched with torchrun --nproc-per-node N -m pyro_inflow")
    t.add_argument("data", metavar="DATA.npy")
    t.add_argument("--out", required=True, metavar="FLOW")
    t.add_argument("--schedule", choices=("prp", "prr"), default=None)
    t.add_argument("--dims-to-keep", type=int, default=None, metavar="d")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--t-max", type=float, default=None)
    t.add_argument("--hidden", type=int, default=None)
    t.add_argument("--depth", type=int, default=None)
    t.add_argument("--patience", type=int, default=None, metavar="N",
                   help="early stopping: stop after N validation checks without improvement "
                        "and keep the best weights (default 4; 0 trains all steps)")
    t.add_argument("--no-recalibrate", action="store_true",
                   help="keep the latent as trained where the held-out check fails (default: "
                        "a radial recalibration fitted on the held-out split)")
    t.add_argument("--checkpoint", default=None,
                   help="resumable checkpoint file (default FLOW.ckpt, removed on success)")
    t.add_argument("--checkpoint-every", type=int, default=1000)
    t.add_argument("--resume", default=None, metavar="CHECKPOINT")
    t.add_argument("--device", default=None, help="where the network trains: cpu, cuda, "
                   "cuda:1, ... (default: the CPU; under torchrun with NCCL, cuda:LOCAL_RANK); "
                   "the flow file loads on any device")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("encode", help="latents Z (n, d) of DATA.npy (n, D)")
    e.add_argument("flow", metavar="FLOW")
    e.add_argument("data", metavar="DATA.npy")
    e.add_argument("--out", required=True, metavar="Z.npy")
    _solver_args(e)
    e.set_defaults(func=cmd_encode)

    dc = sub.add_parser("decode", help="data X (n, D) of latents Z.npy (n, d)")
    dc.add_argument("flow", metavar="FLOW")
    dc.add_argument("latents", metavar="Z.npy")
    dc.add_argument("--out", required=True, metavar="X.npy")
    dc.add_argument("--fill", type=_fill_arg, default="zeros", metavar="{zeros,normal,EPS}",
                    help="PR-reducing flows: compressed coordinates: zeros (default), normal "
                    "(N(0, 1), the full-rank model's end state) or N(0, EPS^2) draws")
    dc.add_argument("--seed", type=int, default=0)
    _solver_args(dc)
    dc.set_defaults(func=cmd_decode)

    s = sub.add_parser("sample", help="N samples (N, D) from the flow")
    s.add_argument("flow", metavar="FLOW")
    s.add_argument("-n", type=int, required=True, metavar="N")
    s.add_argument("--out", required=True, metavar="X.npy")
    s.add_argument("--seed", type=int, default=0)
    _solver_args(s)
    s.set_defaults(func=cmd_sample)

    c = sub.add_parser("calibrate", help="coverage, credible regions, roundtrip of a flow on "
                       "HELDOUT.npy: table, report.json, plots")
    c.add_argument("flow", metavar="FLOW")
    c.add_argument("heldout", metavar="HELDOUT.npy", help="held-out data (n, D), not trained on")
    c.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    c.add_argument("--compare", default=None, metavar="FLOW2",
                   help="a second flow (e.g. another seed): report latent identifiability")
    c.add_argument("--levels", type=float, nargs="+", default=None,
                   help="nominal levels (default 0.5 0.68 0.9 0.95 0.99)")
    _solver_args(c, rows=False)
    c.set_defaults(func=cmd_calibrate)

    lp = sub.add_parser("log-prob", help="log-densities (n,) of DATA.npy (PR-preserving)")
    lp.add_argument("flow", metavar="FLOW")
    lp.add_argument("data", metavar="DATA.npy")
    lp.add_argument("--out", required=True, metavar="LP.npy")
    lp.add_argument("--trace", choices=("auto", "exact", "hutchinson"), default="auto")
    _solver_args(lp)
    lp.set_defaults(func=cmd_log_prob)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pyro-inflow``; returns the exit status."""
    args = _build_parser().parse_args(argv)
    try:
        _check_out(getattr(args, "out", None), getattr(args, "checkpoint", None))
        args.func(args)
    except (ValueError, TypeError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"pyro-inflow: error: {msg}", file=sys.stderr)
        return 2
    except (SolverError, FloatingPointError) as e:
        print(f"pyro-inflow: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"pyro-inflow: interrupted{'; ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
