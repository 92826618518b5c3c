"""Paged latent cache bookkeeping: a block allocator with reference counts and prefix hashing.

The cache tensor itself is `[num_layers, num_blocks * block_size, kv_lora_rank + qk_rope_head_dim]` (made by
the model); this module only decides which blocks a request owns. A full block is identified by the hash
of its tokens chained to its parent block's hash, so equal prefixes map to equal block chains. Freed blocks
keep their hash and go to the back of the free queue; they are reused as a cache hit until a new
allocation takes them from the front (least recently freed first).
"""

from __future__ import annotations

from collections import OrderedDict

from routed.engine.request import Request


def block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """Chained hashes of the full blocks of a token sequence."""
    hashes, parent = [], 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start : start + block_size])))
        hashes.append(parent)
    return hashes


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which served from it

    # ---- queries ----------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        total = -(-(req.num_computed + num_new_tokens) // self.block_size)
        return max(0, total - len(req.block_table))

    # ---- allocation -------------------------------------------------------------------------------
    def admit(self, req: Request) -> None:
        """Reuse cached full blocks of the request's tokens (always leaving one token to compute)."""
        if not self.prefix_caching or req.block_table:
            return
        tokens = req.all_ids
        reusable = (len(tokens) - 1) // self.block_size
        for h in block_hashes(tokens, self.block_size)[:reusable]:
            block = self.cached.get(h)
            if block is None:
                break
            if self.ref_count[block] == 0:
                del self.free[block]
            self.ref_count[block] += 1
            req.block_table.append(block)
        req.num_computed = len(req.block_table) * self.block_size
        req.num_cached_tokens = req.num_computed

    def record_admission(self, req: Request) -> None:
        """Count an admitted request's prompt lookups and prefix-cache hits."""
        self.prefix_queries += req.num_tokens
        self.prefix_hits += req.num_cached_tokens

    def allocate(self, req: Request, num_new_tokens: int) -> bool:
        """Give the request blocks for `num_new_tokens` more tokens; False (and nothing taken) if too few free."""
        need = self.blocks_needed(req, num_new_tokens)
        if need > self.num_free:
            return False
        for _ in range(need):
            block, _ = self.free.popitem(last=False)
            old = self.hash_of[block]
            if old is not None and self.cached.get(old) == block:
                del self.cached[old]
            self.hash_of[block] = None
            self.ref_count[block] = 1
            req.block_table.append(block)
        return True

    def commit(self, req: Request) -> None:
        """Register the request's newly filled full blocks under their prefix hashes."""
        if not self.prefix_caching:
            return
        tokens, bs, parent = req.all_ids, self.block_size, 0
        for i in range(req.num_computed // bs):
            block = req.block_table[i]
            h = self.hash_of[block]
            if h is None:
                h = hash((parent, tuple(tokens[i * bs : (i + 1) * bs])))
                self.hash_of[block] = h
                self.cached.setdefault(h, block)
            parent = h

    def release(self, req: Request) -> None:
        """Drop the request's blocks (finish, abort or preemption); cached ones stay reusable."""
        for block in reversed(req.block_table):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free[block] = None
        req.block_table = []
        req.num_computed = 0
