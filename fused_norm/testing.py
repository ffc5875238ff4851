"""Switches for testing the CUDA kernels without a GPU.

A build made with ``FUSED_NORM_CUDA_EMULATION=1`` holds the CUDA kernels compiled for a
CPU emulator beside the CPU kernels. While emulation is on (``emulate_cuda()``, or the
environment variable ``FUSED_NORM_EMULATE_CUDA=1`` at import), every ``fused_norm`` op on
CPU tensors runs the CUDA path (the launcher's workspace sizes, tier and grid choice, and
the kernels) instead of the CPU kernels, with barriers, warp collectives, shared memory
and launch limits checked. Every CPU allocation is filled with NaN bytes meanwhile, so
an output a kernel fails to write shows. ``FUSED_NORM_EMULATE_CUDA_SCHEDULE`` and
``FUSED_NORM_EMULATE_CUDA_SMS`` set the initial schedule and SM count.

Emulation proves logic, bounds, barriers and alignment; it says nothing of speed, and its
bits differ from a GPU's (rsqrt, FMA contraction).
"""

import contextlib

from . import _C

__all__ = ["emulation_available", "emulate_cuda", "emulated_launches"]


def emulation_available() -> bool:
    """Whether this build holds the emulated CUDA kernels."""
    return hasattr(_C, "set_cuda_emulation")


def _require():
    if not emulation_available():
        raise RuntimeError("fused_norm was built without the CUDA emulator: rebuild it with "
                           "FUSED_NORM_CUDA_EMULATION=1 pip install --no-build-isolation -e .")


@contextlib.contextmanager
def emulate_cuda(schedule=None, sms=None):
    """Runs ops on CPU tensors through the emulated CUDA kernels inside the block.

    schedule: the order in which a block's threads run between sync points:
        ``"forward"``, ``"reverse"`` or ``"random:SEED"`` (None: leave as is).
    sms: the emulated device's multiprocessor count (None: leave as is; 132 at start,
        as an H100). Grids depend on it; small counts make grid-stride loops repeat.
    The previous settings come back on exit.
    """
    _require()
    saved = (_C.cuda_emulation(), _C.emulated_schedule(), _C.emulated_sms())
    try:
        if schedule is not None:
            _C.set_emulated_schedule(schedule)
        if sms is not None:
            _C.set_emulated_sms(sms)
        _C.set_cuda_emulation(True)
        yield
    finally:
        _C.set_cuda_emulation(saved[0])
        _C.set_emulated_schedule(saved[1])
        _C.set_emulated_sms(saved[2])


def emulated_launches() -> int:
    """Kernels launched under emulation so far in this process."""
    _require()
    return _C.emulated_launches()
