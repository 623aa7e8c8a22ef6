"""What the paged KV cache of a model looks like: per-layer tensor layout, dtype, bytes per token.

Layouts (one tensor per attention layer, block b holds tokens [b*block_size, (b+1)*block_size) of a sequence
through its block table; flat slot = block_id * block_size + offset):
- "gqa": [2, num_blocks, block_size, num_kv_heads, head_dim]   (index 0 = keys, 1 = values)
- "mla": [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]   (normalised latent, then RoPE'd key)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fractal.errors import FractalError


@dataclass(frozen=True)
class KVCacheSpec:
    kind: str                       # "gqa" | "mla"
    num_layers: int
    token_shape: tuple[int, ...]    # per layer per token: gqa (2, num_kv_heads, head_dim); mla (latent + rope,)
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.kind not in ("gqa", "mla"):
            raise FractalError(f"KV cache kind {self.kind!r} is not valid; valid: ['gqa', 'mla']")

    @property
    def elements_per_token_per_layer(self) -> int:
        return math.prod(self.token_shape)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token occupies across all layers."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * self.elements_per_token_per_layer * itemsize

    def bytes_per_block(self, block_size: int) -> int:
        return self.bytes_per_token * block_size

    def num_blocks_for(self, budget_bytes: int, block_size: int) -> int:
        """How many blocks of `block_size` tokens fit in `budget_bytes` (all layers)."""
        return max(0, int(budget_bytes) // self.bytes_per_block(block_size))

    def layer_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        if self.kind == "gqa":
            two, heads, dim = self.token_shape
            return (two, num_blocks, block_size, heads, dim)
        return (num_blocks, block_size, *self.token_shape)

    def allocate(self, num_blocks: int, block_size: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """One zeroed cache tensor per layer."""
        if num_blocks < 1 or block_size < 1:
            raise FractalError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        shape = self.layer_shape(num_blocks, block_size)
        return [torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(self.num_layers)]
