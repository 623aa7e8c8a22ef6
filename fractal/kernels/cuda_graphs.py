"""Capture a step function as CUDA graphs at a ladder of batch sizes; replay the smallest size >= the batch.

Generic over what the step does: `fn(**inputs)` takes tensors whose dim 0 is the batch (tokens for decode)
and returns a tensor or a tuple/list/dict of tensors with the batch in dim 0. The ladder owns one set of static
input buffers at the largest size; each captured size works on views [:n] of them, and all graphs share one
memory pool (captured largest first, so the smaller ones reuse its blocks). `run(n, **inputs)` copies the n
real rows in, fills the padding rows n..size with `pad_values` (so padded decode rows stay valid: e.g.
seq_lens 1, block table 0), replays, and returns the outputs sliced to n rows.

Everything `fn` reads that is not an input (weights, KV cache, block tables that the runner updates in place)
must stay at the same address between capture and replay. Kernels inside must not synchronise with the host:
pass host-known bounds (max_seq_len) as fixed values. Without CUDA (or enabled=False) `run` calls fn eagerly.
"""
from __future__ import annotations

import bisect
from typing import Any, Callable, Mapping, Sequence

import torch

from fractal.errors import FractalError


def _slice(out: Any, n: int) -> Any:
    if isinstance(out, torch.Tensor):
        return out[:n]
    if isinstance(out, (tuple, list)):
        return type(out)(_slice(o, n) for o in out)
    if isinstance(out, dict):
        return {k: _slice(v, n) for k, v in out.items()}
    return out


class CudaGraphLadder:
    def __init__(
        self,
        fn: Callable[..., Any],
        static_inputs: Mapping[str, torch.Tensor],
        sizes: Sequence[int],
        pad_values: Mapping[str, float] | None = None,
        warmup: int = 2,
        enabled: bool | None = None,
    ) -> None:
        if not sizes or min(sizes) < 1:
            raise FractalError(f"graph ladder sizes {list(sizes)} must be a non-empty list of positive batch sizes")
        self.sizes = sorted(set(int(s) for s in sizes))
        self.max_size = self.sizes[-1]
        for name, t in static_inputs.items():
            if t.shape[0] < self.max_size:
                raise FractalError(f"static input {name!r} has {t.shape[0]} rows; the ladder needs {self.max_size}")
        self.fn = fn
        self.inputs = dict(static_inputs)
        self.pad_values = dict(pad_values or {})
        if enabled is None:
            enabled = torch.cuda.is_available() and all(t.is_cuda for t in self.inputs.values())
        self.enabled = enabled
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Any]] = {}
        if enabled:
            self._capture(warmup)

    def _views(self, n: int) -> dict[str, torch.Tensor]:
        return {k: v[:n] for k, v in self.inputs.items()}

    def _capture(self, warmup: int) -> None:
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):  # compiles Triton kernels, creates library handles
                for n in self.sizes:
                    self.fn(**self._views(n))
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        for n in reversed(self.sizes):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                out = self.fn(**self._views(n))
            self.graphs[n] = (g, out)
        torch.cuda.synchronize()

    def padded_size(self, n: int) -> int:
        """The captured size a batch of n rows replays at."""
        i = bisect.bisect_left(self.sizes, n)
        if n < 1 or i == len(self.sizes):
            raise FractalError(f"batch {n} is outside the captured ladder 1..{self.max_size}; run it eagerly")
        return self.sizes[i]

    def run(self, n: int, **inputs: torch.Tensor) -> Any:
        """Copy the n real rows of each given input in, pad, replay; outputs sliced to n rows."""
        size = self.padded_size(n)
        for name, value in inputs.items():
            buf = self.inputs[name]
            buf[:n].copy_(value[:n])
        for name, buf in self.inputs.items():
            if size > n:
                buf[n:size].fill_(self.pad_values.get(name, 0))
        if not self.enabled:
            return _slice(self.fn(**self._views(size)), n)
        g, out = self.graphs[size]
        g.replay()
        return _slice(out, n)


def replay_us(graph: torch.cuda.CUDAGraph, reps: int = 10, warm: int = 3) -> float:
    """Mean microseconds per replay of a captured graph, timed with CUDA events after `warm` untimed replays
    (the kernel-timing tools use it)."""
    for _ in range(warm):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def calls_us(fns, repeats: int = 5, reps: int = 10) -> float:
    """Mean microseconds per call of `fns` (callables that launch GPU work), each run once eagerly (compiles,
    allocations), then captured `repeats` times over in one CUDA graph and timed with replay_us."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        for _ in range(repeats):
            for f in fns:
                f()
    torch.cuda.synchronize()
    return replay_us(graph, reps) / (repeats * len(fns))
