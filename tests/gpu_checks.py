"""GPU-only checks, run by .ci/gpu on a machine with a CUDA device (not collected by pytest).

    python tests/gpu_checks.py tour [--reductions]   every kernel tier once, small shapes
                                                     (for compute-sanitizer), against the
                                                     CPU kernels
    python tests/gpu_checks.py large                 LayerNorm, residual add + RMSNorm and
                                                     BatchNorm over more than 2^31 elements
    python tests/gpu_checks.py graph                 forward + backward captured in a CUDA
                                                     graph and replayed, against eager

Each exits non-zero on a mismatch.
"""

import argparse
import sys

import torch
import torch.nn.functional as F

import fused_norm

ops = torch.ops.fused_norm

# The shapes of tests/test_cuda_emulation.py that reach each tier and branch.
LN_SHAPES = [(5, 8), (37, 32), (19, 64), (9, 256), (6, 1024), (3, 2048), (4, 8192), (3, 20000),
             (7, 1), (9, 33), (5, 255), (3, 1025), (2, 5003)]
BN_SHAPES = [((4, 3, 16, 16), None), ((3, 5, 7, 7), None), ((2, 3, 9), None), ((16, 3, 1024), None),
             ((1, 2, 16384), None), ((6, 1, 10, 10), None), ((4, 16, 5, 5), torch.channels_last),
             ((3, 7, 3, 3), torch.channels_last), ((2048, 8), None), ((300, 37), None)]
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
          (torch.float64, torch.float64)]


def _close(a, b, what, dtype):
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 3e-2)
    a, b = a.double().cpu(), b.double().cpu()
    if not torch.allclose(a, b, rtol=tol, atol=tol, equal_nan=True):
        print(f"MISMATCH {what}: max |diff| {(a - b).abs().nan_to_num().max().item():.3g}")
        return False
    return True


def tour(reductions_only):
    ok = True
    for dtype, wdtype in DTYPES:
        if not reductions_only:
            for rows, cols in LN_SHAPES:
                x = torch.randn(rows, cols, dtype=dtype)
                dy = torch.randn(rows, cols, dtype=dtype)
                w = torch.rand(cols, dtype=wdtype) + 0.5
                b = torch.randn(cols, dtype=wdtype)
                res = []
                for dev in ("cpu", "cuda"):
                    y, mean, rstd = ops.layer_norm_fwd(x.to(dev), [cols], w.to(dev), b.to(dev), 1e-5)
                    res.append((y,) + tuple(ops.layer_norm_bwd(dy.to(dev), x.to(dev), [cols], mean, rstd,
                                                               w.to(dev), b.to(dev))))
                for name, c, g in zip(("y", "dx", "dweight", "dbias"), *res):
                    ok &= _close(g, c, f"layer_norm {name} {rows}x{cols} {dtype}", dtype)
                ok &= _tour_rms_and_add(x, dy, w, b)
        for shape, fmt in BN_SHAPES:
            x = torch.randn(shape, dtype=dtype) + 1
            dy = torch.randn(shape, dtype=dtype)
            if fmt is not None:
                x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
            C = shape[1]
            w, b = torch.rand(C, dtype=wdtype) + 0.5, torch.randn(C, dtype=wdtype)
            for training in (True, False):
                res = []
                for dev in ("cpu", "cuda"):
                    rm, rv = torch.zeros(C, dtype=wdtype, device=dev), torch.ones(C, dtype=wdtype, device=dev)
                    nbt = torch.tensor(2, device=dev)
                    out = ops.batch_norm_fwd(x.to(dev), w.to(dev), b.to(dev), rm, rv, nbt, training, 0.1, 1e-5)
                    grads = ops.batch_norm_bwd(dy.to(dev), x.to(dev), w.to(dev), b.to(dev), out[1], out[2], training)
                    stats = ops.batch_norm_stats(x.to(dev))
                    res.append((out[0], rm, rv) + tuple(grads) + tuple(stats))
                names = ("y", "running_mean", "running_var", "dx", "dweight", "dbias", "stats_mean", "stats_var")
                for name, c, g in zip(names, *res):
                    ok &= _close(g, c, f"batch_norm {name} {shape} {fmt} {dtype} training={training}", dtype)
    torch.cuda.synchronize()
    return ok


def _tour_rms_and_add(x, dy, w, b):
    """RMSNorm, and the residual add of both norms (pre-norm: the sum stored, its gradient
    added; post-norm: the sum formed again), on CUDA against the CPU kernels."""
    ok = True
    rows, cols = x.shape
    dtype = x.dtype
    r = torch.randn(rows, cols, dtype=torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    ds = torch.randn(rows, cols, dtype=r.dtype)
    res = []
    for dev in ("cpu", "cuda"):
        X, DY, W, B, R, DS = (t.to(dev) for t in (x, dy, w, b, r, ds))
        y, rstd = ops.rms_norm_fwd(X, [cols], W, 1e-5, 0.0, False)
        out = [y, *ops.rms_norm_bwd(DY, X, [cols], rstd, W, 0.0)]
        for store in (True, False):
            y, s, mean, rstd = ops.add_layer_norm_fwd(X, R, [cols], W, B, 1e-5, False, store)
            xs, rs, dss = (s, None, DS) if store else (X, R, None)
            out += [y, s, *ops.add_layer_norm_bwd(DY, dss, xs, rs, [cols], mean, rstd, W, B, r.dtype, r.dtype)]
            y, s, rstd = ops.add_rms_norm_fwd(X, R, [cols], W, 1e-5, 1.0, True, False, store)
            out += [y, s, *ops.add_rms_norm_bwd(DY, dss, xs, rs, [cols], rstd, W, 1.0, r.dtype, r.dtype)]
        res.append(out)
    for i, (c, g) in enumerate(zip(*res)):
        ok &= _close(g, c, f"rms/add output {i} {rows}x{cols} {dtype}", dtype)
    return ok


def large():
    ok = True
    rows, cols = 2**21 + 3, 1024  # LayerNorm: 2^31 + 3072 bf16 elements
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(cols, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    xg = x.requires_grad_()
    y = fused_norm.layer_norm(xg, (cols,), w)
    tail = slice(rows - 5, rows)
    ok &= _close(y[tail], F.layer_norm(x[tail].detach(), (cols,), w.detach()), "large layer_norm y tail",
                 torch.bfloat16)
    y.backward(torch.ones_like(y))
    ok &= bool(torch.isfinite(xg.grad[tail]).all() and torch.isfinite(w.grad).all())
    del x, xg, y, w
    torch.cuda.empty_cache()
    # Residual add + RMSNorm over 2^31 + 3072 bf16 elements, pre-norm; the last rows.
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(cols, device="cuda", dtype=torch.bfloat16)
    y, s = fused_norm.add_rms_norm(x, r, (cols,), w, 1e-6)
    s_ref = x[tail] + r[tail]
    ok &= bool(torch.equal(s[tail], s_ref))
    ok &= _close(y[tail], F.rms_norm(s_ref, (cols,), w, 1e-6), "large add_rms_norm y tail", torch.bfloat16)
    del x, r, y, s
    torch.cuda.empty_cache()
    # BatchNorm: (4, 16, 2^25 + 3) bf16, 2^31 + 192 elements; the last channel's outputs.
    shape = (4, 16, 2**25 + 3)
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16).requires_grad_()
    bn = fused_norm.FusedBatchNorm1d(16).cuda()
    y = bn(x)
    last = y[:, -1].float()
    ok &= _close(last.mean(), torch.tensor(0.0), "large batch_norm mean of last channel", torch.bfloat16)
    ok &= _close(last.var(), torch.tensor(1.0), "large batch_norm var of last channel", torch.bfloat16)
    y.backward(torch.ones_like(y))
    ok &= bool(torch.isfinite(x.grad[:, -1]).all())
    torch.cuda.synchronize()
    return ok


def graph():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), fused_norm.FusedBatchNorm2d(8), torch.nn.Flatten(1),
                                torch.nn.Linear(8 * 6 * 6, 64), fused_norm.FusedLayerNorm(64)).cuda()
    static_x = torch.randn(4, 3, 8, 8, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up on a side stream, as CUDA graph capture requires
            model(static_x).sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    model.zero_grad(set_to_none=False)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = model(static_x)
        static_y.sum().backward()
    ok = True
    for step in range(3):
        x = torch.randn(4, 3, 8, 8, device="cuda")
        static_x.copy_(x)
        model.zero_grad(set_to_none=False)
        g.replay()
        y_graph = static_y.clone()
        grads_graph = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=False)
        y_eager = model(x)
        y_eager.sum().backward()
        ok &= _close(y_graph, y_eager.detach(), f"graph y step {step}", torch.float32)
        for i, (a, b) in enumerate(zip(grads_graph, (p.grad for p in model.parameters()))):
            ok &= _close(a, b, f"graph grad {i} step {step}", torch.float32)
    torch.cuda.synchronize()
    return ok


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("check", choices=["tour", "large", "graph"])
    p.add_argument("--reductions", action="store_true", help="tour: the BatchNorm reductions only")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    ok = {"tour": lambda: tour(args.reductions), "large": large, "graph": graph}[args.check]()
    print(f"{args.check}: {'OK' if ok else 'FAILED'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
