"""Block manager: KV cache blocks of `block_size` token slots, handed to requests as they grow.

Bookkeeping only (no tensors): a request's `block_table` lists its blocks in order; token p of the
request lives in row block_table[p // block_size] * block_size + p % block_size.
"""

from __future__ import annotations

from collections import deque

from lorascope.engine.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, req: Request, num_tokens: int) -> int:
        """Extra blocks `req` needs to hold `num_tokens` tokens in total."""
        return max(0, -(-num_tokens // self.block_size) - len(req.block_table))

    def can_allocate(self, req: Request, num_tokens: int) -> bool:
        return self.blocks_needed(req, num_tokens) <= len(self._free)

    def allocate(self, req: Request, num_tokens: int) -> None:
        need = self.blocks_needed(req, num_tokens)
        if need > len(self._free):
            raise RuntimeError(f"request {req.request_id}: needs {need} blocks, {len(self._free)} free")
        req.block_table.extend(self._free.popleft() for _ in range(need))

    def free(self, req: Request) -> None:
        self._free.extend(req.block_table)
        req.block_table = []
