"""CPU BatchNorm training forward, taken apart: how its time compares with a read-only pass
over x and a write-only pass over y of the same size.

The fused kNCS training forward reads x once (a block of channels at a time: statistics,
then the normalize from cache) and writes y once, the bytes of a copy. But on each core a
block's statistics (reads) must finish before its normalize (writes), so its time can be
compared with read-only + write-only rather than with a copy, which reads and writes at
once. Per run (CpuTimer: interleaved rounds, medians), for one shape and dtype:

  copy          y.copy_(x)
  write only    y.zero_()
  read only     fused_norm::batch_norm_stats(x)   (the statistics alone: x read once)
  eval          fused_norm.batch_norm, training=False (x read, y written; no statistics)
  train         fused_norm.batch_norm, training=True
  torch train   torch.nn.functional.batch_norm, training=True

    python benchmarks/phases.py                       # bf16 32x256x28x28, 5 runs
    python benchmarks/phases.py --shape 16,256,1024 --dtype fp32 --runs 3
"""

import argparse
import statistics

import torch
import torch.nn.functional as F

import fused_norm
from timing import CpuTimer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def one_run(x: torch.Tensor, rounds: int) -> dict:
    C = x.shape[1]
    w, b = torch.randn(C), torch.randn(C)
    rm, rv = torch.zeros(C), torch.ones(C)
    y = torch.empty_like(x)
    builders = {
        "copy": lambda: (lambda: y.copy_(x)),
        "write only": lambda: (lambda: y.zero_()),
        "read only": lambda: (lambda: torch.ops.fused_norm.batch_norm_stats(x)),
        "eval": lambda: (lambda: fused_norm.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5)),
        "train": lambda: (lambda: fused_norm.batch_norm(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5)),
        "torch train": lambda: (lambda: F.batch_norm(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5)),
    }
    samples = CpuTimer(rounds, budget_s=30.0).measure(builders)
    for name, s in samples.items():
        if isinstance(s, Exception):
            raise RuntimeError(f"{name} failed") from s
    return {name: statistics.median(s) for name, s in samples.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="32,256,28,28", help="comma list, (N, C, ...) (default: %(default)s)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--runs", type=int, default=5, help="runs, each its own median (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=60, help="interleaved rounds per run (default: %(default)s)")
    args = p.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    x = torch.randn(shape).to(DTYPES[args.dtype])
    mb = x.numel() * x.element_size() / 1e6
    print(f"BatchNorm training forward, {args.dtype} {'x'.join(map(str, shape))} (x: {mb:.2f} MB), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, CPU kernels {fused_norm.cpu_capability()}")
    runs = [one_run(x, args.rounds) for _ in range(args.runs)]
    names = list(runs[0])
    print()
    print("| run | " + " | ".join(f"{n} ms" for n in names) + " | read + write ms | train / (read + write) "
          "| torch / train | 2.0x needs ms |")
    print("|---" * (len(names) + 5) + "|")
    for i, r in enumerate(runs, 1):
        rw = r["read only"] + r["write only"]
        print(f"| {i} | " + " | ".join(f"{r[n] * 1e3:.3f}" for n in names)
              + f" | {rw * 1e3:.3f} | {r['train'] / rw:.2f} | {r['torch train'] / r['train']:.2f}"
              f" | {r['torch train'] / 2 * 1e3:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
