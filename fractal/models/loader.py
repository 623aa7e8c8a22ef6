"""Build a model from an HF directory: config.json + safetensors (single or sharded), or dummy weights.

    load_model(path, dtype=torch.bfloat16, device="cpu", load_format="auto")

The model is built on the meta device, materialised directly on `device` in `dtype` (the DeepSeek-V3
e_score_correction_bias stays float32, as in HF), then every weight is filled: from the checkpoint, or for
load_format="dummy" from a seeded normal(0, 0.02) (norm weights 1, biases 0). Checkpoint tensors that the model
does not use (rotary inv_freq, DeepSeek MTP layers past num_hidden_layers, ...) are skipped; a tensor the model
needs and the checkpoint lacks is an error naming it.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fractal.errors import FractalError
from fractal.layers.attention_backends import get_attention_backend
from fractal.layers.mla import check_mla_mode
from fractal.layers.moe import get_moe_backend
from fractal.layers.norm import RMSNorm
from fractal.layers.weight_slots import collect_weight_slots
from fractal.models.base import CausalLM
from fractal.models.config import ModelConfig, parse_model_config
from fractal.models.registry import get_model_class

log = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "dummy")
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
DUMMY_STD = 0.02


def load_hf_config(model_path: str | Path) -> dict[str, Any]:
    """config.json of an HF model directory as a dict (FractalError naming the file if missing or unreadable)."""
    path = Path(model_path)
    if not path.is_dir():
        raise FractalError(f"model path {str(path)!r} is not a directory")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FractalError(f"{cfg_file}: not found (an HF model directory needs config.json)")
    try:
        data = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FractalError(f"{cfg_file}: cannot be read as JSON ({e})") from None
    if not isinstance(data, dict):
        raise FractalError(f"{cfg_file}: must hold a JSON object, got {type(data).__name__}")
    return data


def resolve_dtype(dtype: torch.dtype | str, hf: dict[str, Any] | None = None) -> torch.dtype:
    """torch dtype, or a name ("bfloat16", "fp16", ...; "auto" = config.json's dtype, else bfloat16)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise FractalError(f"dtype {dtype} is not supported; valid: float32, bfloat16, float16")
        return dtype
    if dtype == "auto":
        name = (hf or {}).get("dtype") or (hf or {}).get("torch_dtype") or "bfloat16"
        return _DTYPES.get(str(name), torch.bfloat16)
    if dtype not in _DTYPES:
        raise FractalError(f"dtype {dtype!r} is not valid; valid: {sorted(_DTYPES) + ['auto']}")
    return _DTYPES[dtype]


def build_model(
    config: ModelConfig,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    attention_backend: str | None = None,
    moe_backend: str | None = None,
    mla_mode: str = "auto",
) -> CausalLM:
    """The model with allocated but unset weights (fill them with load_weights or init_dummy_weights)."""
    device = torch.device(device)
    cls = get_model_class(config.architecture)
    attn = get_attention_backend(device, attention_backend)
    moe = get_moe_backend(device, moe_backend)
    with torch.device("meta"):
        model = cls(config, attn, moe, check_mla_mode(mla_mode))
    model.to(dtype)
    check_fits(model, device, config.architecture)
    for module in model.modules():
        for name in getattr(module, "keep_fp32", ()):
            param = getattr(module, name, None)
            if param is not None:
                param.data = param.data.float()
    model.to_empty(device=device)
    model.requires_grad_(False)
    return model.eval()


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory where the weights will live: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_fits(model: nn.Module, device: torch.device, what: str, headroom: float = 0.95) -> None:
    """Refuse, with the numbers, to allocate weights that cannot fit: a clear error instead of an OOM kill."""
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    have = available_memory_bytes(device)
    if have is not None and need > headroom * have:
        raise FractalError(
            f"{what}: the weights need {need / 1e9:.1f} GB in {next(model.parameters()).dtype} but {device} has "
            f"{have / 1e9:.1f} GB free; use a smaller model, a narrower dtype or a device with more memory"
        )


def init_dummy_weights(model: nn.Module, seed: int = 0, std: float = DUMMY_STD) -> None:
    """Deterministic random weights: normal(0, std) for matrices/embeddings, 1 for RMSNorm weights, 0 for biases."""
    norm_weights = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if id(param) in norm_weights:
                param.fill_(1.0)
            elif param.dim() == 1:
                param.zero_()
            else:
                gen = generators.get(param.device)
                if gen is None:
                    gen = generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
                param.normal_(0.0, std, generator=gen)


def _checkpoint_files(path: Path) -> dict[Path, list[str] | None]:
    """file -> tensor names to read from it (None = all)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise FractalError(f"{index}: cannot be read as a safetensors index with a 'weight_map' ({e})") from None
        files: dict[Path, list[str] | None] = {}
        for name, fname in weight_map.items():
            files.setdefault(path / fname, []).append(name)
        for f in files:
            if not f.is_file():
                raise FractalError(f"{f}: shard listed in {index.name} is missing")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return {single: None}
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise FractalError(
            f"{path}: no model.safetensors, model.safetensors.index.json or *.safetensors file "
            f"(use load_format='dummy' for random weights)"
        )
    return {f: None for f in found}


def load_weights(model: CausalLM, model_path: str | Path) -> None:
    """Fills every weight of `model` from the safetensors checkpoint in `model_path`."""
    from safetensors import SafetensorError, safe_open

    path = Path(model_path)
    primary, alternates = collect_weight_slots(model)
    loaded: set[str] = set()
    skipped: list[str] = []
    num_layers = model.config.num_layers
    for file, names in _checkpoint_files(path).items():
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in names if names is not None else list(f.keys()):
                    slot = primary.get(name) or alternates.get(name)
                    if slot is None:
                        m = _LAYER_RE.match(name)
                        if not (name.endswith("rotary_emb.inv_freq") or (m and int(m.group(1)) >= num_layers)):
                            skipped.append(name)
                        continue
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != slot.shape:
                        raise FractalError(
                            f"{file}: tensor {name!r} has shape {list(shape)}, the model expects {list(slot.shape)} "
                            f"(does config.json match the checkpoint?)"
                        )
                    slot.load(f.get_tensor(name))
                    loaded.update(slot.covers or (name,))
        except SafetensorError as e:
            raise FractalError(f"{file}: cannot be read as safetensors ({e})") from None
        except OSError as e:
            raise FractalError(f"{file}: cannot be read ({e})") from None
    missing = [n for n in primary if n not in loaded]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise FractalError(f"{path}: checkpoint lacks tensor {missing[0]!r}{more}")
    if skipped:
        log.warning("%s: ignored %d checkpoint tensors the model does not use, e.g. %s", path, len(skipped), skipped[0])


def load_model(
    model_path: str | Path,
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    device: torch.device | str = "cpu",
    load_format: str = "auto",
    attention_backend: str | None = None,
    moe_backend: str | None = None,
    mla_mode: str = "auto",
    seed: int = 0,
) -> CausalLM:
    """An HF model directory -> a ready, eval-mode model on `device` in `dtype`.

    load_format: "auto"/"safetensors" read the checkpoint; "dummy" needs only config.json (random weights
    seeded by `seed`). attention_backend / moe_backend: names registered in fractal.layers (None = device
    default). mla_mode: "auto" | "absorb" | "mha" (MLA models only).
    """
    if load_format not in LOAD_FORMATS:
        raise FractalError(f"load_format {load_format!r} is not valid; valid: {list(LOAD_FORMATS)}")
    hf = load_hf_config(model_path)
    config = parse_model_config(hf, str(Path(model_path) / "config.json"))
    model = build_model(
        config, dtype=resolve_dtype(dtype, hf), device=device,
        attention_backend=attention_backend, moe_backend=moe_backend, mla_mode=mla_mode,
    )
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        quant = hf.get("quantization_config")
        if quant:
            method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
            raise FractalError(
                f"{Path(model_path) / 'config.json'}: quantized checkpoints (quant_method {method!r}) are not "
                f"supported; use a bfloat16/float16/float32 checkpoint, or load_format='dummy'"
            )
        load_weights(model, model_path)
    return model
