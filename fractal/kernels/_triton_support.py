"""Whether the Triton fast paths can run here, decided once without importing Triton on CPU-only machines.

Triton is imported only when CUDA is available, so importing `fractal.kernels.*` on a CPU machine is cheap and
never fails; every public kernel function falls back to its plain-torch reference for CPU tensors.
With TRITON_INTERPRET=1 (and Triton installed) the kernels also run on CPU tensors through Triton's interpreter:
slow, for debugging kernels without a GPU.
"""
from __future__ import annotations

import functools
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# streaming multiprocessors of the GPUs the launch heuristics are tuned for (H100 SXM / H200); it only steers
# split and partial counts, so another GPU gets correct results with a slightly different grid
NUM_SMS = 132

HAS_TRITON = False
triton = None  # type: ignore[assignment]
tl = None  # type: ignore[assignment]

if torch.cuda.is_available() or INTERPRET:
    try:
        import triton  # type: ignore[no-redef]
        import triton.language as tl  # type: ignore[no-redef]

        HAS_TRITON = True
    except Exception:  # pragma: no cover - depends on the machine
        HAS_TRITON = False


@functools.lru_cache(maxsize=None)
def pdl_enabled() -> bool:
    """Programmatic Dependent Launch (Hopper and later; FRACTAL_PDL=0 turns it off): kernels launched with
    `pdl_launch()` may start while the kernel before them drains, and wait in `pdl_wait` before touching memory.
    Decided on first use, not at import (no CUDA context for a CPU-only import)."""
    if not HAS_TRITON or INTERPRET or os.environ.get("FRACTAL_PDL", "1") == "0" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability()[0] >= 9


@functools.lru_cache(maxsize=None)
def pdl_launch() -> dict:
    """Keyword arguments for launching a kernel whose first statement is pdl_wait(PDL): the PDL constexpr and, where
    PDL is on, the launch flag (one dict per process; callers only unpack it)."""
    return {"PDL": True, "launch_pdl": True} if pdl_enabled() else {"PDL": False}


if HAS_TRITON:

    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        """First statement of a kernel launched with pdl_launch(): wait until the previous kernel in the stream has
        finished and its writes are visible (griddepcontrol.wait), then let the next kernel launch early
        (griddepcontrol.launch_dependents; it starts once every program of this one has got here, and waits in
        its own pdl_wait). Nothing before this may read or write memory another kernel touches."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when every tensor is on a CUDA device and Triton is importable."""
    return HAS_TRITON and (INTERPRET or all(t.is_cuda for t in tensors))


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def compiled_variants() -> int:
    """How many Triton binaries fractal's kernels hold now (0 without Triton): a rise between two points of a
    run means a kernel was compiled there (a new specialisation), which costs 0.1-1 s of host time."""
    return sum(compiled_variants_by_kernel().values())


def compiled_variants_by_kernel() -> dict[str, int]:
    """compiled_variants per kernel name ("module.function")."""
    counts: dict[str, int] = {}
    for label, _ in compiled_variant_keys():
        counts[label] = counts.get(label, 0) + 1
    return counts


def compiled_variant_keys() -> set[tuple[str, str]]:
    """(kernel, specialisation key) of every compiled Triton binary of fractal's kernels: diff two snapshots to
    see which variant a run compiled."""
    if not HAS_TRITON:
        return set()
    import sys

    keys: set[tuple[str, str]] = set()
    for name, module in list(sys.modules.items()):
        if not name.startswith("fractal.kernels.") or module is None:
            continue
        for obj in vars(module).values():
            if isinstance(obj, triton.runtime.JITFunction) and getattr(obj, "device_caches", None):
                label = f"{name.rsplit('.', 1)[-1]}.{getattr(obj, '__name__', '?')}"
                keys.update((label, str(key)) for key, _ in compiled_binaries(obj))
    return keys


def compiled_binaries(fn) -> list:
    """(specialisation key, compiled kernel) of every binary one Triton JIT function holds, on every device."""
    out = []
    for entry in getattr(fn, "device_caches", {}).values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        out.extend(cache.items() if hasattr(cache, "items") else ())
    return out
