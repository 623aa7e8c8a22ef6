"""Precision per part of the model: weights (per part), activations (= matmul input dtype, which picks the
GPU peak), KV cache, and communication payloads.

Weight dtype strings: bf16, fp16, fp8, int8, int4, and int4 with a quantisation group, `int4g128`
(4-bit values plus one `scale_bytes`-byte scale per 128 weights; plain `int4` ignores scales, as the
seed article does). `w4a8` is accepted as a weight dtype meaning int4 weights (activations set apart).

Spec strings (CLI `--weights`): one dtype for every part (`fp8`), or per part, comma-separated:
`attn=fp8,moe=int4g128,dense=fp8,embed=bf16` (parts: attn, dense, moe, shared, router, embed, head;
`default=` sets the rest). The article's "attention FP8, MoE W4A8" is `--weights attn=fp8,dense=fp8,moe=w4a8 --act fp8`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from fractal.errors import FractalError

_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
_PARTS = ("attn", "dense", "moe", "shared", "router", "embed", "head")


def dtype_bytes(dtype: str, scale_bytes: float = 2.0) -> float:
    """Bytes per element. `int4g<G>` adds scale_bytes / G per weight for the group scales."""
    d = dtype.lower().strip()
    if d == "w4a8":
        d = "int4"
    if d in _BYTES:
        return _BYTES[d]
    m = re.fullmatch(r"int4g(\d+)", d)
    if m and int(m.group(1)) > 0:
        return 0.5 + scale_bytes / int(m.group(1))
    raise FractalError(f"unknown dtype {dtype!r}; valid: bf16, fp16, fp8, int8, int4, int4g<group> (e.g. int4g128), w4a8")


@dataclass(frozen=True)
class Precision:
    """Dtypes per part. act is the dtype matmul inputs use (bf16/fp8/int8): it picks the GPU's peak FLOP/s
    and sizes activations (fp32 is costed at the bf16 tensor-core peak, so its floor stays a lower bound).
    comm is the dtype of TP/EP/PP payloads (the seed article assumes bf16)."""

    attn: str = "bf16"
    dense: str = "bf16"
    moe: str = "bf16"
    shared: str = "bf16"
    router: str = "bf16"
    embed: str = "bf16"
    head: str = "bf16"
    act: str = "bf16"
    kv: str = "bf16"
    comm: str = "bf16"

    def weight_bytes(self, part: str) -> float:
        return dtype_bytes(getattr(self, part))

    @property
    def act_bytes(self) -> float:
        return dtype_bytes(self.act)

    @property
    def kv_bytes(self) -> float:
        return dtype_bytes(self.kv)

    @property
    def comm_bytes(self) -> float:
        return dtype_bytes(self.comm)

    @property
    def compute_dtype(self) -> str:
        return "bf16" if self.act in ("fp16", "fp32") else self.act


def parse_precision(weights: str = "bf16", act: str | None = None, kv: str = "bf16", comm: str = "bf16") -> Precision:
    """Build a Precision from CLI-style strings. act defaults to bf16, or fp8 when every weight part is fp8."""
    parts: dict[str, str] = {}
    default = "bf16"
    for item in [s.strip() for s in weights.split(",") if s.strip()]:
        if "=" in item:
            k, v = (x.strip().lower() for x in item.split("=", 1))
            if k == "default":
                default = v
            elif k in _PARTS:
                parts[k] = v
            else:
                raise FractalError(f"unknown weight part {k!r} in {weights!r}; valid parts: {', '.join(_PARTS)}, default")
        else:
            default = item.lower()
    full = {p: parts.get(p, default) for p in _PARTS}
    # router and norms stay in high precision unless asked; the embedding/head follow the default only if asked
    if "router" not in parts:
        full["router"] = "bf16"
    for p, v in full.items():
        dtype_bytes(v)
    if act is None:
        main = {v for k, v in full.items() if k in ("attn", "dense", "moe", "shared")}
        act = "fp8" if main <= {"fp8", "w4a8"} else (main.pop() if main in ({"fp32"}, {"fp16"}) else "bf16")
    for name, v in (("act", act), ("kv", kv), ("comm", comm)):
        if v.lower() not in ("bf16", "fp16", "fp8", "int8", "fp32"):
            raise FractalError(f"--{name} {v!r} is not valid; choose bf16, fp16, fp8 or int8")
    return Precision(**full, act=act.lower(), kv=kv.lower(), comm=comm.lower())
