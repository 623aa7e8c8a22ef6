"""Which KV blocks each sequence holds: allocation, prefix hits, forks and release. Pure Python.

Conventions: a sequence's block `i` holds its tokens `i*block_size .. (i+1)*block_size - 1`. A block
is shared (ref_cnt > 1) only when it is full and computed, so nobody ever writes into a shared block:
writes go to positions >= num_computed_tokens, which lie beyond every shared block.
"""
from __future__ import annotations

from fractal.engine.block_pool import Block, BlockPool, hash_block
from fractal.engine.request import Sequence, SeqStatus


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.prefix_queries = 0  # tokens looked up in the prefix cache (at admission)
        self.prefix_hits = 0  # of which were found cached

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used_blocks

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    # --- admission ---------------------------------------------------------------------------------
    def update_hashes(self, seq: Sequence) -> None:
        """Extend seq.block_hashes to cover every full block of its tokens."""
        bs = self.block_size
        while len(seq.block_hashes) < seq.num_tokens // bs:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if i else None
            seq.block_hashes.append(hash_block(parent, seq.token_ids[i * bs : (i + 1) * bs]))

    def shareable_parent_blocks(self, seq: Sequence) -> list[Block]:
        """The parent's full prompt blocks a forked sibling can share (empty if the parent is not ready)."""
        parent = seq.parent
        if parent is None or parent.status is not SeqStatus.RUNNING or not parent.prompt_computed:
            return []
        count = min(len(parent.block_ids), (seq.num_prompt_tokens - 1) // self.block_size)
        return [self.pool.blocks[b] for b in parent.block_ids[:count]]

    def cached_prefix_blocks(self, seq: Sequence) -> list[Block]:
        """Longest run of cached blocks matching seq's leading full blocks, leaving >= 1 token to compute."""
        if not self.enable_prefix_caching:
            return []
        self.update_hashes(seq)
        limit = (seq.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in seq.block_hashes[:limit]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit_tokens

    # --- allocation --------------------------------------------------------------------------------
    def allocate_slots(self, seq: Sequence, num_new_tokens: int, computed_blocks: list[Block] | None = None) -> bool:
        """Make seq's blocks cover its computed tokens + `num_new_tokens`; False (and no change) if the pool is short.

        `computed_blocks` (only for a sequence holding no blocks yet) are prefix hits or a parent's
        blocks: they are shared, and `seq.num_computed_tokens` must be set to cover them by the caller.
        """
        computed_blocks = computed_blocks or []
        if computed_blocks and seq.block_ids:
            raise RuntimeError("computed blocks are only taken by a sequence that holds none")
        num_computed = max(seq.num_computed_tokens, len(computed_blocks) * self.block_size)
        required = cdiv(num_computed + num_new_tokens, self.block_size)
        have = len(seq.block_ids) + len(computed_blocks)
        num_new_blocks = max(0, required - have)
        # touching a free cached block takes it off the free list, so it cannot count as free too
        num_reclaimed = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if num_new_blocks > self.pool.num_free_blocks - num_reclaimed:
            return False
        self.pool.touch(computed_blocks)
        new_blocks = self.pool.allocate(num_new_blocks)
        seq.block_ids.extend(b.block_id for b in computed_blocks)
        seq.block_ids.extend(b.block_id for b in new_blocks)
        # shared blocks already hold their content hash; count them as registered
        if computed_blocks:
            seq.num_registered_blocks = len(computed_blocks)
        return True

    def register_computed_blocks(self, seq: Sequence) -> None:
        """Offer seq's full, computed blocks to the prefix cache (call after a step computed them)."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_ids))
        if num_full <= seq.num_registered_blocks:
            return
        self.update_hashes(seq)
        for i in range(seq.num_registered_blocks, num_full):
            self.pool.cache(self.pool.blocks[seq.block_ids[i]], seq.block_hashes[i])
        seq.num_registered_blocks = num_full

    def free(self, seq: Sequence) -> None:
        """Release every block of seq (tail first, so a prefix's later blocks are evicted first)."""
        self.pool.free([self.pool.blocks[b] for b in reversed(seq.block_ids)])
        seq.block_ids = []
        seq.num_registered_blocks = 0
