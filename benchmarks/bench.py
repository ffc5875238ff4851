#!/usr/bin/env python
"""Benchmark fused_norm against what one would use instead, on the device present.

    python benchmarks/bench.py                      # everything, on CUDA if present, else CPU
    python benchmarks/bench.py --quick              # smoke run (CI), well under a minute on 2 cores
    python benchmarks/bench.py --ops ln --dtypes bf16 --sweeps ln-quack --peers torch,compile
    python benchmarks/bench.py --list               # the sweeps and ops of this device

Measures LayerNorm forward / backward / forward+backward and BatchNorm training forward,
training forward+backward and eval forward over shape sweeps (cases.py), next to torch eager,
torch.compile and, where importable, apex, Liger-Kernel, QuACK and (add + norm) flash-attn (impls.py). Reports the
median time, GB/s over the bytes each case must move, % of the device's peak bandwidth (GPU),
% of a same-size copy measured in the same run, and the speedup over each peer; on CPU also
the speedup targets over torch eager. Writes results.md (the run's conditions first), results.json
and PNG plots (a speedup summary, and GB/s per shape for each sweep, op and dtype) to a new folder
benchmarks/out/<device>-<date>-<time>/ (git-ignored), prints the markdown and where it went. The
committed reference results under benchmarks/results/ change only when named with --out. A case
that fails is recorded with its error and the run goes on.
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

import cases
import report
from timing import CpuTimer, CudaTimer

try:
    import impls
except ImportError as e:  # fused_norm is not built: --help and --list still answer, a run stops in main
    impls, IMPLS_ERROR = None, e

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"  # default: a new folder per run, git-ignored
RESULTS = HERE / "results"  # the committed reference runs: written only when --out names them
# Time budgets per case (CPU: all implementations together) or per implementation (CUDA), seconds.
BUDGET_S = {"cpu": 1.0, "cuda": 0.25}
DEFAULT_REPS = {"cpu": 50, "cuda": 100}
QUICK_REPS, QUICK_BUDGET_S = 5, 0.1


def _csv(choices: dict | list, aliases: dict | None = None):
    """argparse type: comma-separated names out of choices (or aliases expanding to several)."""
    aliases = aliases or {}

    def parse(text: str) -> list:
        names = []
        for item in filter(None, (s.strip() for s in text.split(","))):
            if item not in choices and item not in aliases:
                raise argparse.ArgumentTypeError(f"{item!r} is not one of {', '.join([*choices, *aliases])}")
            names += [n for n in aliases.get(item, [item]) if n not in names]
        return names
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda[:index] (default: cuda when available)")
    p.add_argument("--ops", type=_csv(cases.OPS, {**cases.OP_ALIASES, "all": list(cases.OPS)}),
                   default=list(cases.OPS), help=f"comma list of {', '.join(cases.OPS)}, or ln, rms, bn, all")
    p.add_argument("--dtypes", type=_csv(cases.DTYPES), help="comma list of fp32, bf16, fp16 "
                   "(default: fp32,bf16 on CPU, all three on CUDA)")
    p.add_argument("--sweeps", help="comma list of sweep names (default: all of the device's; see --list)")
    peers = f"comma list of {', '.join(impls.PEERS)}, or none" if impls else "comma list of peers, or none"
    p.add_argument("--peers", type=_csv(impls.PEERS, {"none": []}) if impls else str,
                   help=f"{peers} (default: all; --quick: torch)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    p.add_argument("--compile-all", action="store_true",
                   help="on CPU, measure torch.compile in every sweep (default: target cases only, as "
                        "compiling every shape takes long on a small CPU)")
    p.add_argument("--reps", type=int, help="most repetitions per measurement (default: 50 CPU rounds, "
                   "100 CUDA calls; fewer when the time budget runs out: 1 s per CPU case, 0.25 s per "
                   "CUDA implementation)")
    p.add_argument("--cuda-graph", action="store_true", help="CUDA: replay each call from a CUDA graph")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (one small shape per kind, 5 reps)")
    p.add_argument("--out", type=Path, help="output directory (default: a new benchmarks/out/<device>-<UTC date>-"
                   "<time>/; --out benchmarks/results/<device> replaces the committed reference results)")
    p.add_argument("--list", action="store_true", help="print the sweeps and ops and exit")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    if args.device.type not in ("cpu", "cuda"):
        p.error("--device must be cpu or cuda")
    available = cases.sweeps_for(args.device.type, args.quick)
    try:
        sweeps = _csv(available)(args.sweeps) if args.sweeps else list(available)
    except argparse.ArgumentTypeError as e:
        p.error(f"--sweeps: {e} (on {args.device.type}{' with --quick' if args.quick else ''})")
    args.sweeps = [available[name] for name in sweeps]
    args.dtypes = args.dtypes or list(cases.DEFAULT_DTYPES[args.device.type])
    if impls is None:
        if args.list:
            return args
        p.error(f"fused_norm does not import ({IMPLS_ERROR}): build it first (bash benchmarks/run.sh builds it)")
    if args.peers is None:
        args.peers = ["torch"] if args.quick else list(impls.PEERS)
    if args.no_compile and "compile" in args.peers:
        args.peers.remove("compile")
    if args.reps is not None and args.reps < 1:
        p.error("--reps must be at least 1")
    args.reps = args.reps or (QUICK_REPS if args.quick else DEFAULT_REPS[args.device.type])
    return args


def list_cases(args) -> str:
    lines = ["Ops:"] + [f"  {op.name:<14} {op.description}" for op in cases.OPS.values()]
    lines.append(f"Sweeps on {args.device.type}{' (--quick)' if args.quick else ''}:")
    for sweep in cases.sweeps_for(args.device.type, args.quick).values():
        lines.append(f"  {sweep.name:<18} {sweep.description}")
        lines += [f"      {s.text}" for s in sweep.shapes]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------

def make_inputs(case: cases.Case, device: torch.device) -> impls.Inputs:
    dtype = cases.DTYPES[case.dtype]
    grad = case.op.direction != "fwd"
    x = torch.randn(case.shape.dims, device=device, dtype=dtype)
    if case.shape.channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    x.requires_grad_(grad)
    dy = torch.randn_like(x) if grad else None  # keeps x's memory format
    if case.shape.norm in ("ln", "rms"):
        n = case.shape.dims[-1]
        weight = 1 + 0.1 * torch.randn(n, device=device, dtype=dtype)
        bias = 0.1 * torch.randn(n, device=device, dtype=dtype)
        residual = torch.randn_like(x).requires_grad_(grad) if case.op.residual else None
        return impls.Inputs(x, dy, weight.requires_grad_(grad), bias.requires_grad_(grad), residual=residual,
                            pre_norm=case.op.residual == "pre", rms=case.op.rms)
    c = case.shape.dims[1]
    weight = 1 + 0.1 * torch.randn(c, device=device)
    bias = 0.1 * torch.randn(c, device=device)
    return impls.Inputs(x, dy, weight.requires_grad_(grad), bias.requires_grad_(grad),
                        running_mean=0.1 * torch.randn(c, device=device),
                        running_var=1 + 0.1 * torch.rand(c, device=device))


def build_call(impl: impls.Impl, case: cases.Case, inputs: impls.Inputs):
    """The function timed for one implementation: the forward under no_grad, the backward of one
    stored forward (autograd.grad with retain_graph), or forward then backward."""
    fwd, params = impl.forward(case.op.norm, inputs, case.op.training)  # (an RMSNorm op runs on LayerNorm shapes)
    x, dy = inputs.x, inputs.dy
    if case.op.direction == "fwd":
        def forward():
            with torch.no_grad():
                return fwd(x)
        return forward
    wrt = [x, *params]

    def grad(y, **kwargs):  # a tuple of outputs (pre-norm add + LayerNorm: y and the sum) each gets dy
        ys = y if isinstance(y, tuple) else (y,)
        return torch.autograd.grad(ys, wrt, (dy,) * len(ys), **kwargs)
    if case.op.direction == "bwd":
        y = fwd(x)
        return lambda: grad(y, retain_graph=True)
    return lambda: grad(fwd(x))


def build_copy(inputs: impls.Inputs):
    src = inputs.x.detach()
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip()}"[:4000]


def _memory_shortfall(case: cases.Case, device: torch.device) -> str | None:
    """Rough need: x, y, dy, dx, saved tensors and peers' temporaries, as multiples of x."""
    x_bytes = case.shape.numel * cases.DTYPES[case.dtype].itemsize
    need = x_bytes * (3 if case.op.direction == "fwd" else 6)
    free, _ = torch.cuda.mem_get_info(device)
    if need > free:
        return f"skipped: needs about {need / 2**30:.1f} GiB of GPU memory, {free / 2**30:.1f} GiB free"
    return None


def _stats(samples: list, nbytes: int, copy_gbps: float | None, peak_gbps: float | None) -> dict:
    med = statistics.median(samples)
    deciles = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else [med] * 9
    gbps = nbytes / med / 1e9
    return {"median_s": med, "p20_s": deciles[1], "p80_s": deciles[7], "reps": len(samples), "gbps": gbps,
            "pct_peak": 100 * gbps / peak_gbps if peak_gbps else None,
            "pct_copy": 100 * gbps / copy_gbps if copy_gbps else None,
            "samples_s": samples}


class Runner:
    def __init__(self, args, env: dict):
        self.args, self.env = args, env
        self.device = args.device
        budget = QUICK_BUDGET_S if args.quick else BUDGET_S[self.device.type]
        self.timer = (CpuTimer(args.reps, budget) if self.device.type == "cpu"
                      else CudaTimer(self.device, args.reps, budget, args.cuda_graph))
        self.impls = [impls.OURS()] + [impls.PEERS[name]() for name in args.peers]
        self._unavailable = {}

    def unavailable(self, impl: impls.Impl, op: cases.Op) -> str | None:
        key = (impl.name, op.norm, op.residual is not None, op.rms)
        if key not in self._unavailable:
            self._unavailable[key] = impl.unavailable_op(op, self.device.type)
        return self._unavailable[key]

    def skip_reason(self, impl: impls.Impl, case: cases.Case) -> str | None:
        reason = self.unavailable(impl, case.op)
        if reason:
            return reason
        if (impl.name == "compile" and self.device.type == "cpu" and not self.args.compile_all
                and not case.sweep.cpu_compile):
            return "torch.compile on CPU is not measured in this sweep (--compile-all for every sweep)"
        return None

    def run(self, case: cases.Case) -> dict:
        """Measures one case; whatever goes wrong is recorded in the returned record."""
        started = time.perf_counter()
        rec = {"sweep": case.sweep.name, "case": case.id, "op": case.op.name, "norm": case.shape.norm,
               "direction": case.op.direction, "training": case.op.training, "dtype": case.dtype,
               "shape": list(case.shape.dims), "layout": case.shape.layout, "shape_text": case.shape.text,
               "label": case.shape.tick, "bytes": cases.bytes_moved(case),
               "x_bytes": case.shape.numel * cases.DTYPES[case.dtype].itemsize,
               "target_case": case.shape.target, "impls": {}}
        if self.device.type == "cpu" and not self.args.quick:  # CPU targets; a smoke run is not judged
            rec["target"], rec["verdict"] = cases.cpu_target(case), "n/a"
        try:
            self._measure(case, rec)
        except Exception as e:  # noqa: BLE001 -- e.g. a CUDA error outside the timed calls
            rec["error"] = _error(e)
        finally:
            gc.collect()
            if self.device.type == "cuda":
                try:
                    torch.cuda.empty_cache()
                except Exception as e:  # noqa: BLE001
                    rec.setdefault("error", _error(e))
            rec["wall_s"] = round(time.perf_counter() - started, 2)  # including warm-up and compilation
        return rec

    def _measure(self, case: cases.Case, rec: dict) -> None:
        runnable = []
        for impl in self.impls:
            reason = self.skip_reason(impl, case)
            if reason:
                rec["impls"][impl.name] = {"skipped": reason}
            else:
                runnable.append(impl)
        if self.device.type == "cuda":
            shortfall = _memory_shortfall(case, self.device)
            if shortfall:
                rec["error"] = shortfall
                return
        inputs = make_inputs(case, self.device)
        builders = {impl.name: functools.partial(build_call, impl, case, inputs) for impl in runnable}
        builders["copy"] = functools.partial(build_copy, inputs)
        timings = self.timer.measure(builders)
        del inputs, builders

        copy = timings.pop("copy")
        copy_gbps = None
        if isinstance(copy, BaseException):
            rec["copy"] = {"error": _error(copy)}
        else:
            copy_gbps = 2 * rec["x_bytes"] / statistics.median(copy) / 1e9
            rec["copy"] = {"median_s": statistics.median(copy), "gbps": copy_gbps, "samples_s": copy}
        for name, result in timings.items():
            rec["impls"][name] = ({"error": _error(result)} if isinstance(result, BaseException)
                                  else _stats(result, rec["bytes"], copy_gbps, self.env["peak_bandwidth_GBps"]))
        ours = rec["impls"]["fused_norm"].get("median_s")
        rec["speedup"] = {name: entry["median_s"] / ours for name, entry in rec["impls"].items()
                          if ours and name != "fused_norm" and "median_s" in entry}
        if "verdict" in rec and "torch" in rec["speedup"]:
            rec["verdict"] = "met" if rec["speedup"]["torch"] >= rec["target"] else "MISSED"

    def notes(self, ops: list) -> list:
        notes = []
        for impl in self.impls:
            why = [self.unavailable(impl, op) for op in ops]
            reasons = sorted(set(filter(None, why)))
            if why and all(why):
                notes.append(f"{impl.label}: not measured ({'; '.join(reasons)}).")
            else:
                notes += [f"{impl.label}: {r}; skipped there." for r in reasons]
                if impl.note:
                    notes.append(impl.note)
        compiled = [s.name for s in self.args.sweeps if s.cpu_compile]
        if (self.device.type == "cpu" and "compile" in self.args.peers and not self.args.compile_all
                and len(compiled) < len(self.args.sweeps)):
            notes.append(f"torch.compile on CPU is measured in {', '.join(compiled) or 'no sweep'} only, as "
                         "compiling every shape takes long (--compile-all for every sweep).")
        return notes


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        print(list_cases(args))
        return 0
    if args.device.type == "cuda":
        torch.cuda.set_device(args.device)
    env = report.environment(args.device)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    outdir = args.out or OUT / f"{report.device_slug(env)}{'-quick' if args.quick else ''}-{stamp}"
    outdir.mkdir(parents=True, exist_ok=True)
    if outdir.resolve().is_relative_to(RESULTS):
        print(f"note: writing into the committed reference results {outdir}", file=sys.stderr)
    requested = [cases.OPS[name] for name in args.ops]
    runner = Runner(args, env)
    notes = runner.notes(requested) + report.optional_modules_note()
    ops = [op for op in requested if not runner.unavailable(runner.impls[0], op)]  # fused_norm can run
    all_cases = cases.make_cases(args.sweeps, ops, args.dtypes)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"{len(all_cases)} cases on {env['device']} -> {outdir}", file=sys.stderr)

    started = time.perf_counter()
    contention = report.Contention()
    results = []
    for case in report.progress(all_cases, lambda c: f"{c.sweep.name}: {c.id}"):
        results.append(runner.run(case))
    elapsed = time.perf_counter() - started
    env["others_cpu_share"] = contention.others_share()
    if report.disturbed(env):
        print(f"WARNING: {report.disturbed(env)}. Rerun on an idle machine.", file=sys.stderr)

    run = {
        "environment": env,
        "settings": {"device": str(args.device), "sweeps": [s.name for s in args.sweeps], "ops": args.ops,
                     "dtypes": args.dtypes, "peers": args.peers, "reps": args.reps, "quick": args.quick,
                     "cuda_graph": args.cuda_graph, "compile_all": args.compile_all,
                     "timing": runner.timer.describe(), "elapsed_s": round(elapsed, 1)},
        "notes": notes + [f"{len(all_cases)} cases in {elapsed:.0f} s."],
        "bytes_counted": cases.BYTES_NOTE,
        "ops": {op.name: op.description for op in requested},
        "implementations": {impl.name: {"label": impl.label, "version": impl.version(),
                                        "unavailable": {n: impl.unavailable(n, args.device.type)
                                                        for n in ("ln", "bn")}}
                            for impl in runner.impls},
        "sweeps": {s.name: {"description": s.description, "x_label": s.x_label,
                            "shapes": [s_.text for s_ in s.shapes]} for s in args.sweeps},
        "results": results,
    }
    print(report.write(run, outdir))
    print(f"{len(all_cases)} cases in {elapsed:.0f} s; results in {outdir}/: results.md, results.json and "
          f"{len(run['plots'])} plots", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
