"""The KV block pool: ref counts, a free list in LRU order and the prefix-cache index. Pure Python.

Every physical block `0 .. num_blocks-1` is either referenced (ref_cnt > 0, held by one or more
sequences) or free. Free blocks sit in `_free` (an ordered dict used as an LRU queue: the front is
evicted first). A full block whose content is known carries a `block_hash`; while it is in
`_cached` (hash -> block id) another sequence with the same prefix can take it, even after its last
owner dropped it: that is the prefix cache, and allocation evicts such blocks front-first (LRU).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from fractal.errors import FractalError


def hash_block(parent_hash: bytes | None, token_ids: list[int] | tuple[int, ...]) -> bytes:
    """Content hash of one full block, chained on the hash of the block before it (sha256 digest)."""
    h = hashlib.sha256(parent_hash or b"root")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


@dataclass(eq=False)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise FractalError(f"num_blocks={num_blocks} is invalid: the KV pool needs at least one block")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, int] = {}
        self.num_evictions = 0

    # --- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence references (some may still hold cached prefixes)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def lookup(self, block_hash: bytes) -> Block | None:
        """The cached block holding this content, or None. Does not take a reference."""
        block_id = self._cached.get(block_hash)
        return None if block_id is None else self.blocks[block_id]

    # --- ownership -------------------------------------------------------------------------------
    def allocate(self, count: int) -> list[Block]:
        """Take `count` free blocks (LRU first), evicting their cached content. Caller checks there are enough."""
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} blocks with {len(self._free)} free")
        out = []
        for _ in range(count):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: list[Block]) -> None:
        """Take one more reference on each block (prefix hit or fork); free ones leave the free list."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: list[Block]) -> None:
        """Drop one reference each, in the given order; blocks reaching zero join the back of the LRU queue.

        Callers pass a sequence's blocks tail first, so a prefix's later blocks are evicted before its
        earlier ones (an earlier block is useful to more prompts).
        """
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"block {block.block_id} freed more often than taken")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None or not self.enable_caching:
                    self._evict(block)
                    self._free[block.block_id] = None
                    self._free.move_to_end(block.block_id, last=False)  # plain blocks are reused first
                else:
                    self._free[block.block_id] = None

    def cache(self, block: Block, block_hash: bytes) -> None:
        """Record that `block` (full, computed) holds the content `block_hash`.

        If that content is already cached in another block, this block stays uncached (a duplicate).
        """
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self._cached:
            return
        block.block_hash = block_hash
        self._cached[block_hash] = block.block_id

    def _evict(self, block: Block) -> None:
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) == block.block_id:
                del self._cached[block.block_hash]
                self.num_evictions += 1
            block.block_hash = None
