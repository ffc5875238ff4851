"""What the benchmark measures, as data: the operations, the shape sweeps for each device,
the bytes each case must move, and the CPU speedup targets."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_DTYPES = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "bf16", "fp16")}


@dataclass(frozen=True)
class Op:
    name: str
    norm: str  # "ln" (LayerNorm), "rms" (RMSNorm) or "bn" (BatchNorm)
    direction: str  # "fwd", "bwd" or "fwdbwd"
    training: bool | None  # BatchNorm: batch statistics (training) or running statistics (eval)
    description: str
    residual: str | None = None  # residual add + norm: "pre" (the sum is an output too) or "post"
    rms: bool = False  # residual add + RMSNorm instead of LayerNorm (no bias)


OPS = {
    op.name: op
    for op in (
        Op("ln_fwd", "ln", "fwd", None, "LayerNorm forward"),
        Op("ln_bwd", "ln", "bwd", None, "LayerNorm backward"),
        Op("ln_fwdbwd", "ln", "fwdbwd", None, "LayerNorm forward+backward"),
        Op("rms_fwd", "rms", "fwd", None, "RMSNorm forward"),
        Op("rms_bwd", "rms", "bwd", None, "RMSNorm backward"),
        Op("rms_fwdbwd", "rms", "fwdbwd", None, "RMSNorm forward+backward"),
        Op("bn_train_fwd", "bn", "fwd", True, "BatchNorm training forward"),
        Op("bn_fwdbwd", "bn", "fwdbwd", True, "BatchNorm training forward+backward"),
        Op("bn_eval", "bn", "fwd", False, "BatchNorm eval forward"),
        Op("addln_post_fwd", "ln", "fwd", None, "post-norm LayerNorm(x + residual) forward", "post"),
        Op("addln_post_fwdbwd", "ln", "fwdbwd", None, "post-norm LayerNorm(x + residual) forward+backward", "post"),
        Op("addln_pre_fwd", "ln", "fwd", None, "pre-norm (LayerNorm(x + residual), x + residual) forward", "pre"),
        Op("addln_pre_fwdbwd", "ln", "fwdbwd", None, "pre-norm (LayerNorm(x + residual), x + residual) "
           "forward+backward", "pre"),
        Op("addrms_post_fwd", "ln", "fwd", None, "post-norm RMSNorm(x + residual) forward", "post", True),
        Op("addrms_post_fwdbwd", "ln", "fwdbwd", None, "post-norm RMSNorm(x + residual) forward+backward", "post",
           True),
        Op("addrms_pre_fwd", "ln", "fwd", None, "pre-norm (RMSNorm(x + residual), x + residual) forward", "pre", True),
        Op("addrms_pre_fwdbwd", "ln", "fwdbwd", None, "pre-norm (RMSNorm(x + residual), x + residual) "
           "forward+backward", "pre", True),
    )
}
OP_ALIASES = {"ln": [n for n in OPS if n.startswith("ln_")], "rms": [n for n in OPS if n.startswith("rms_")],
              "bn": [n for n in OPS if n.startswith("bn_")],
              "addln": [n for n in OPS if n.startswith("addln_")],
              "addrms": [n for n in OPS if n.startswith("addrms_")]}


@dataclass(frozen=True)
class Shape:
    norm: str  # "ln": (rows, hidden), normalized over the last dim (LayerNorm and RMSNorm cases); "rms":
    # the same for RMSNorm cases only; "bn": (N, C, *spatial)
    dims: tuple
    channels_last: bool = False
    label: str = ""  # x-axis tick in plots; the dims by default
    target: bool = False  # a CPU target case (see cpu_target)

    @property
    def layout(self) -> str:
        if self.norm in ("ln", "rms"):
            return "rows"
        names = {2: "NC", 3: "NCL", 4: "NCHW", 5: "NCDHW"}[len(self.dims)]
        return {"NCHW": "NHWC", "NCDHW": "NDHWC"}[names] if self.channels_last else names

    @property
    def numel(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n

    @property
    def text(self) -> str:
        dims = "x".join(map(str, self.dims))
        return dims if self.norm in ("ln", "rms") else f"{dims} {self.layout}"

    @property
    def tick(self) -> str:
        return self.label or self.text


@dataclass(frozen=True)
class Sweep:
    name: str
    description: str
    x_label: str
    shapes: tuple
    cpu_compile: bool = False  # on CPU, torch.compile is measured here by default (else --compile-all)


@dataclass(frozen=True)
class Case:
    sweep: Sweep
    shape: Shape
    op: Op
    dtype: str

    @property
    def id(self) -> str:
        return f"{self.op.name} {self.dtype} {self.shape.text}"


def _ln(rows, hidden, label="", target=False):
    return Shape("ln", (rows, hidden), label=str(label), target=target)


def _qk(tokens, heads, head_dim):
    """Per-head QK-norm: RMSNorm over head_dim of rows = tokens x heads."""
    return Shape("rms", (tokens * heads, head_dim), label=f"{tokens}x{heads}x{head_dim}")


def _bn(*dims, channels_last=False, label="", target=False):
    return Shape("bn", tuple(dims), channels_last, str(label), target)


def _resnet50(batch, channels_last):
    """BatchNorm2d inputs of ResNet-50's stages (stem, conv2_x..conv5_x outputs)."""
    stages = ((64, 112), (256, 56), (512, 28), (1024, 14), (2048, 7))
    return tuple(_bn(batch, c, hw, hw, channels_last=channels_last, label=f"{c}x{hw}x{hw}") for c, hw in stages)


GPU_SWEEPS = (
    Sweep("ln-liger", "LayerNorm, M=4096 rows, N=1024..16384 (Liger-Kernel / Triton tutorial sweep)", "N",
          tuple(_ln(4096, n, n) for n in (1024, 2048, 3072, 4096, 6144, 8192, 12288, 16384))),
    Sweep("ln-quack", "LayerNorm, M=32768 rows, N=256..65536, plus (16384, 131072) and (8192, 262144) (QuACK sweep)",
          "N", tuple(_ln(32768, 2**k, 2**k) for k in range(8, 17))
          + (_ln(16384, 131072, "131072 (M=16384)"), _ln(8192, 262144, "262144 (M=8192)"))),
    Sweep("ln-transformer", "LayerNorm on transformer activations: 16384 rows (batch 8 x seq 2048) x hidden size",
          "hidden", tuple(_ln(16384, h, h) for h in (768, 1024, 4096, 8192))),
    Sweep("qk-norm", "RMSNorm per attention head (QK-norm): rows = tokens x heads, N = head_dim 64 / 128", "tokens x "
          "heads x head_dim", tuple(_qk(t, h, d) for t, h in ((8192, 32), (32768, 32)) for d in (64, 128))),
    Sweep("bn1d", "BatchNorm1d on (N, C)", "shape", (_bn(8192, 1024), _bn(131072, 256))),
    Sweep("bn1d-ncl", "BatchNorm1d on (N, C, L)", "shape", (_bn(128, 256, 1024), _bn(32, 512, 4096))),
    Sweep("bn2d-resnet50", "BatchNorm2d at ResNet-50 layer shapes, batch 256, NCHW", "C x H x W",
          _resnet50(256, False)),
    Sweep("bn2d-resnet50-cl", "BatchNorm2d at ResNet-50 layer shapes, batch 256, channels_last", "C x H x W",
          _resnet50(256, True)),
)

CPU_SWEEPS = (
    Sweep("targets", "CPU target cases (speedup goals over torch eager, see the target column)", "case",
          (_ln(4096, 1024, target=True), _ln(8192, 768, target=True),
           _bn(64, 256, 1024, target=True), _bn(8192, 1024, target=True),
           _bn(32, 256, 28, 28, target=True), _bn(32, 256, 28, 28, channels_last=True, target=True)),
          cpu_compile=True),
    Sweep("ln-liger", "LayerNorm, M=1024 rows, N=1024..16384 (Liger/Triton sweep, scaled down for CPU)", "N",
          tuple(_ln(1024, n, n) for n in (1024, 2048, 4096, 8192, 16384))),
    Sweep("ln-quack", "LayerNorm, M=128 rows, N=256..65536, plus (64, 131072) and (32, 262144) "
          "(QuACK sweep, scaled down for CPU)", "N",
          tuple(_ln(128, 4**k, 4**k) for k in range(4, 9))
          + (_ln(64, 131072, "131072 (M=64)"), _ln(32, 262144, "262144 (M=32)"))),
    Sweep("ln-transformer", "LayerNorm on transformer activations: 2048 rows (batch 4 x seq 512) x hidden size",
          "hidden", tuple(_ln(2048, h, h) for h in (768, 1024, 4096, 8192))),
    Sweep("qk-norm", "RMSNorm per attention head (QK-norm): rows = tokens x heads, N = head_dim 64 / 128 "
          "(scaled down for CPU)", "tokens x heads x head_dim",
          tuple(_qk(t, h, d) for t, h in ((512, 16), (2048, 32)) for d in (64, 128))),
    Sweep("bn1d", "BatchNorm1d on (N, C)", "shape", (_bn(2048, 1024), _bn(32768, 256))),
    Sweep("bn1d-ncl", "BatchNorm1d on (N, C, L)", "shape", (_bn(16, 256, 1024), _bn(8, 64, 8192))),
    Sweep("bn2d-resnet50", "BatchNorm2d at ResNet-50 layer shapes, batch 8, NCHW", "C x H x W", _resnet50(8, False)),
    Sweep("bn2d-resnet50-cl", "BatchNorm2d at ResNet-50 layer shapes, batch 8, channels_last", "C x H x W",
          _resnet50(8, True)),
)

QUICK_SWEEPS = (
    Sweep("quick", "smoke test: one small shape per kind", "case",
          (_ln(256, 1024), _bn(16, 64, 256), _bn(4, 32, 16, 16, channels_last=True)), cpu_compile=True),
)


def sweeps_for(device_type: str, quick: bool) -> dict:
    if quick:
        return {s.name: s for s in QUICK_SWEEPS}
    return {s.name: s for s in (CPU_SWEEPS if device_type == "cpu" else GPU_SWEEPS)}


def make_cases(sweeps, ops, dtypes) -> list:
    """Shape by shape, so all the cases of one input shape run back to back."""
    return [Case(sweep, shape, op, dtype)
            for sweep in sweeps for shape in sweep.shapes for dtype in dtypes for op in ops
            if op.norm == shape.norm or (op.norm == "rms" and shape.norm == "ln")]


# ---------------------------------------------------------------------------------------
# Bytes moved
# ---------------------------------------------------------------------------------------

BN_PARAM_BYTES = 4  # BatchNorm weight, bias and running statistics are float32 (as under AMP)

BYTES_NOTE = (
    "Bytes counted (the minimum traffic of the operation; GB/s = bytes / median time). "
    "LayerNorm (M rows of N; weight and bias in the input dtype): forward reads x, weight and bias and "
    "writes y; backward reads x, dy, weight and the saved mean/rstd (float32) and writes dx, dweight, "
    "dbias. RMSNorm: the same without bias and mean (forward reads x and weight, writes y; backward reads "
    "x, dy, weight and rstd, writes dx and dweight). BatchNorm (E elements, C channels; float32 weight, bias and running statistics): training "
    "forward reads x twice (statistics pass, then normalize pass), reads weight and bias and writes y; "
    "backward reads x and dy twice (reduction pass, then dx pass), reads weight and the saved "
    "mean/invstd and writes dx, dweight, dbias; eval forward reads x, weight, bias and the running "
    "statistics and writes y. Forward+backward is the sum of the two. Running-statistics updates "
    "(2C values) are not counted. Residual add + LayerNorm (E elements, all in the input dtype): forward "
    "reads x, residual, weight and bias and writes y, and the sum for pre-norm; backward reads dy (and the "
    "sum's gradient for pre-norm), the sum (pre-norm) or x and residual (post-norm: formed again), weight "
    "and mean/rstd and writes one dx (the gradient of x and of residual alike), dweight, dbias; RMSNorm counts "
    "the same (its missing bias and mean are 2N + 4M bytes). The copy "
    "reference moves 2 x size(x)."
)


def bytes_moved(case: Case) -> int:
    s = DTYPES[case.dtype].itemsize
    e = case.shape.numel
    if case.op.norm == "rms":
        n = case.shape.dims[-1]
        fwd = 2 * e * s + n * s
        bwd = 3 * e * s + (e // n) * 4 + 2 * n * s
    elif case.shape.norm == "ln":
        n = case.shape.dims[-1]
        rows = e // n
        fwd = 2 * e * s + 2 * n * s
        bwd = 3 * e * s + 2 * rows * 4 + n * s + 2 * n * s
        if case.op.residual == "pre":  # + the sum written; backward: + the sum's gradient read
            fwd, bwd = fwd + 2 * e * s, bwd + e * s
        elif case.op.residual == "post":  # + the residual read, in both directions (the sum is formed again)
            fwd, bwd = fwd + e * s, bwd + e * s
    else:
        c, p = case.shape.dims[1], BN_PARAM_BYTES
        fwd = 3 * e * s + 2 * c * p if case.op.training else 2 * e * s + 4 * c * p
        bwd = 5 * e * s + 2 * c * 4 + c * p + 2 * c * p
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[case.op.direction]


# ---------------------------------------------------------------------------------------
# CPU targets: minimum speedup of fused_norm over torch eager (ratio of medians)
# ---------------------------------------------------------------------------------------

CPU_FLOOR = 0.9  # every CPU case
_CPU_TARGETS = (  # (op, dtypes or None for all, BatchNorm layouts or None for all, target), first match wins
    ("ln_fwd", ("fp32",), None, 1.1),
    ("ln_fwd", ("bf16",), None, 1.5),
    ("ln_fwdbwd", None, None, 1.3),
    ("rms_fwd", None, None, 1.5),  # RMSNorm: over the faster of torch eager and torch.compile
    ("rms_fwdbwd", None, None, 1.3),
    ("bn_train_fwd", None, ("NCL", "NCHW"), 2.0),
    ("bn_fwdbwd", None, ("NC", "NCL", "NCHW", "NHWC"), 1.5),
    ("bn_eval", None, None, 1.0),
    ("addln_post_fwd", ("fp32", "bf16"), None, 1.5),
    ("addln_pre_fwd", None, None, 1.3),
    ("addln_post_fwdbwd", None, None, 1.3),
    ("addln_pre_fwdbwd", None, None, 1.3),
    ("addrms_pre_fwd", None, None, 1.3),
    ("addrms_post_fwdbwd", None, None, 1.3),
    ("addrms_pre_fwdbwd", None, None, 1.3),
)


def cpu_target(case: Case) -> float:
    if case.shape.target:
        for op, dtypes, layouts, target in _CPU_TARGETS:
            if (op == case.op.name and (dtypes is None or case.dtype in dtypes)
                    and (layouts is None or case.shape.layout in layouts)):
                return target
    return CPU_FLOOR
