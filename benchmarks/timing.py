"""Timers. Each takes {name: build} where build() returns the function to time, and returns
{name: list of seconds per call} or {name: the exception that stopped it}.

CpuTimer: interleaved rounds (fused_norm first, then each peer; the order reverses every round),
so the drift of a noisy machine hits every implementation alike; the median is taken later.
CudaTimer: one implementation after the other; CUDA events around each call, an L2 flush
(a large buffer written) before each call, optionally the call replayed from a CUDA graph.
"""

import gc
import time

import torch

MIN_REPS = 5


class CpuTimer:
    method = ("CPU: interleaved rounds of one call of each implementation and of a copy of x (order "
              "reversed each round), median over rounds; two warm-up calls each; no cache flush; up to "
              "{reps} rounds or {budget} s per case (at least {min_reps} rounds)")

    def __init__(self, reps: int, budget_s: float):
        self.reps, self.budget_s = reps, budget_s

    def describe(self) -> str:
        return self.method.format(reps=self.reps, budget=self.budget_s, min_reps=min(MIN_REPS, self.reps))

    def measure(self, builders: dict) -> dict:
        out, fns = {}, {}
        for name, build in builders.items():
            try:
                fn = build()
                for _ in range(2):  # warm-up: compilation, first-call costs, allocator
                    fn()
                fns[name] = fn
            except Exception as e:  # noqa: BLE001 -- recorded, the run goes on
                out[name] = e
        samples = {name: [] for name in fns}
        names = list(fns)
        gc_enabled = gc.isenabled()
        gc.disable()
        try:
            start = time.perf_counter()
            for r in range(self.reps):
                for name in names if r % 2 == 0 else names[::-1]:
                    if name in out:  # failed in an earlier round
                        continue
                    try:
                        t0 = time.perf_counter()
                        fns[name]()
                        samples[name].append(time.perf_counter() - t0)
                    except Exception as e:  # noqa: BLE001
                        out[name] = e
                if r + 1 >= min(MIN_REPS, self.reps) and time.perf_counter() - start > self.budget_s:
                    break
        finally:
            if gc_enabled:
                gc.enable()
        return {**{name: s for name, s in samples.items() if name not in out}, **out}


class CudaTimer:
    method = ("CUDA: CUDA events around each call, {flush} MiB buffer written between calls (L2 flush), "
              "{graph}; warm-up, then up to {reps} calls or {budget} s per implementation (at least "
              "{min_reps}); median")

    def __init__(self, device, reps: int, budget_s: float, cuda_graph: bool):
        self.reps, self.budget_s, self.cuda_graph = reps, budget_s, cuda_graph
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
        self.flush = torch.empty(max(256 << 20, 4 * l2), dtype=torch.int8, device=device)

    def describe(self) -> str:
        graph = "each call replayed from a CUDA graph" if self.cuda_graph else "eager launches (no CUDA graph)"
        return self.method.format(flush=self.flush.numel() >> 20, graph=graph, reps=self.reps,
                                  budget=self.budget_s, min_reps=min(MIN_REPS, self.reps))

    def measure(self, builders: dict) -> dict:
        out = {}
        for name, build in builders.items():
            try:
                out[name] = self._time(self._graphed(build) if self.cuda_graph else build())
            except Exception as e:  # noqa: BLE001
                out[name] = e
                if isinstance(e, torch.OutOfMemoryError):
                    torch.cuda.empty_cache()
        return out

    def _time(self, run) -> list:
        for _ in range(3):
            run()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            run()
        end.record()
        end.synchronize()
        estimate = start.elapsed_time(end) / 5e3
        n = max(min(MIN_REPS, self.reps), min(self.reps, int(self.budget_s / max(estimate, 1e-7))))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for s, e in events:
            self.flush.zero_()
            s.record()
            run()
            e.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) / 1e3 for s, e in events]

    @staticmethod
    def _graphed(build):
        """Build and warm up the function on a side stream, then capture one call of it in a CUDA
        graph on that same stream (a backward runs on the stream of its forward, so a forward
        stored by build() must come from the capturing stream)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            fn = build()
            for _ in range(3):
                fn()
            with torch.cuda.graph(graph, stream=stream):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        return graph.replay
