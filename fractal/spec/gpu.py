"""GpuSpec: one accelerator's four resources, from the shipped table (data/gpus.json) or a user file.

Units inside are SI: FLOP/s, bytes, bytes/s. The table stores vendor units (TFLOPS, GB, GB/s with
1 TB = 1e12) and a source string per number; `load_gpu` converts. A user GPU file is a JSON object
with the same keys as one entry of data/gpus.json (`sources` optional), e.g.

    {"name": "my-gpu", "bf16_tflops": 400, "fp8_tflops": 800, "int8_tops": 800, "hbm_gb": 64,
     "hbm_gbps": 2000, "intra_node_gbps": 400, "inter_node_gbps": 50, "gpus_per_node": 8}
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fractal.errors import FractalError

DATA = Path(__file__).parent / "data" / "gpus.json"
_REQUIRED = ("bf16_tflops", "hbm_gb", "hbm_gbps", "intra_node_gbps", "inter_node_gbps", "gpus_per_node")
_ALIASES = {"h100-sxm": "h100", "h100sxm": "h100", "a100": "a100-80gb", "4090": "rtx4090",
            "rtx-4090": "rtx4090", "910b": "ascend-910b", "h200-sxm": "h200"}


@dataclass(frozen=True)
class GpuSpec:
    """Peak numbers of one GPU. flops_* are dense tensor-core FLOP/s (0.0 = dtype unsupported)."""

    name: str
    bf16_flops: float
    fp8_flops: float
    int8_flops: float
    hbm_bytes: float
    hbm_bw: float  # bytes/s
    intra_node_bw: float  # bytes/s per GPU, one direction
    inter_node_bw: float  # bytes/s per GPU, one direction
    gpus_per_node: int
    full_name: str = ""
    sources: dict = field(default_factory=dict, compare=False, hash=False)

    def peak_flops(self, dtype: str = "bf16") -> float:
        """Dense peak FLOP/s for matmuls whose inputs are `dtype` (bf16/fp16/fp8/int8)."""
        d = dtype.lower()
        if d in ("bf16", "fp16", "fp32"):
            return self.bf16_flops
        if d == "fp8":
            if self.fp8_flops <= 0:
                raise FractalError(f"GPU {self.name!r} has no FP8 tensor cores; use activation dtype bf16 or int8")
            return self.fp8_flops
        if d == "int8":
            return self.int8_flops if self.int8_flops > 0 else self.bf16_flops
        raise FractalError(f"unknown compute dtype {dtype!r}; valid: bf16, fp16, fp8, int8")


def _from_entry(name: str, e: dict) -> GpuSpec:
    missing = [k for k in _REQUIRED if k not in e]
    if missing:
        raise FractalError(f"GPU {name!r} lacks {', '.join(missing)}; required keys: {', '.join(_REQUIRED)}")
    try:
        return GpuSpec(
            name=name,
            bf16_flops=float(e["bf16_tflops"]) * 1e12,
            fp8_flops=float(e.get("fp8_tflops", 0)) * 1e12,
            int8_flops=float(e.get("int8_tops", 0)) * 1e12,
            hbm_bytes=float(e["hbm_gb"]) * 1e9,
            hbm_bw=float(e["hbm_gbps"]) * 1e9,
            intra_node_bw=float(e["intra_node_gbps"]) * 1e9,
            inter_node_bw=float(e["inter_node_gbps"]) * 1e9,
            gpus_per_node=int(e["gpus_per_node"]),
            full_name=str(e.get("full_name", name)),
            sources=dict(e.get("sources", {})),
        )
    except (TypeError, ValueError) as exc:
        raise FractalError(f"GPU {name!r}: a number is malformed ({exc})") from None


def gpu_table() -> dict[str, dict]:
    """The shipped table, raw (vendor units and sources)."""
    return json.loads(DATA.read_text())["gpus"]


def gpu_names() -> list[str]:
    return sorted(gpu_table())


def load_gpu(name_or_path: str | Path) -> GpuSpec:
    """A shipped GPU by name (h20, h800, h100, h200, b200, a100-80gb, l40s, rtx4090, ascend-910b,
    mi300x) or a path to a JSON file in the table's format."""
    if isinstance(name_or_path, GpuSpec):
        return name_or_path
    key = str(name_or_path).strip().lower()
    key = _ALIASES.get(key, key)
    table = gpu_table()
    if key in table:
        return _from_entry(key, table[key])
    path = Path(str(name_or_path))
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise FractalError(f"GPU file {str(path)!r} not found")
        try:
            entry = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise FractalError(f"GPU file {str(path)!r} is not valid JSON: {exc}") from None
        return _from_entry(str(entry.get("name", path.stem)), entry)
    raise FractalError(f"unknown GPU {str(name_or_path)!r}; choose from {', '.join(gpu_names())} or give a JSON file")
