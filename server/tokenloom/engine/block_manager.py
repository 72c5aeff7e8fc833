"""KV block accounting: pure Python, no torch.

The KV store is a fixed pool of blocks of `block_size` token slots. A sequence
owns a block table (a list of block ids). Blocks carry reference counts so that
a sequence can fork (beams sharing their prompt's KV): a fork copies the table
and bumps the counts, and a shared block is copied only when a sharer writes to
it (copy-on-write of the last, partial block).
"""

from __future__ import annotations


class OutOfBlocks(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # A stack: the most recently freed block is reused first, so a lightly loaded server keeps
        # touching the same few blocks (still in the CPU caches; the rest of the store is never
        # made resident, see kv_cache.py) instead of cycling through all of them.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks(self, table: list[int], num_tokens: int) -> int:
        """Blocks `table` lacks to hold `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(table))

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Extend `table` in place so that it holds `num_tokens` tokens."""
        need = self.extra_blocks(table, num_tokens)
        if need > len(self._free):
            raise OutOfBlocks(f"need {need} blocks, {len(self._free)} free")
        for _ in range(need):
            block = self._free.pop()
            self._refs[block] = 1
            table.append(block)

    def free(self, table: list[int]) -> None:
        """Drop one reference to every block of `table` and empty it."""
        for block in table:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free.append(block)
        table.clear()

    def fork(self, table: list[int]) -> list[int]:
        """A new table sharing every block of `table` (no KV is copied)."""
        for block in table:
            self._refs[block] += 1
        return list(table)

    def make_writable(self, table: list[int], position: int) -> tuple[int, int] | None:
        """Ensure the block holding token `position` is owned by `table` alone.

        Returns (src, dst) when a shared block was replaced by a private copy:
        the caller must copy the KV of block src into block dst before writing.
        """
        index = position // self.block_size
        block = table[index]
        if self._refs[block] == 1:
            return None
        if not self._free:
            raise OutOfBlocks("no free block for copy-on-write")
        new = self._free.pop()
        self._refs[new] = 1
        self._refs[block] -= 1
        table[index] = new
        return block, new

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def check_invariants(self, tables: list[list[int]]) -> None:
        """Every block is free xor referenced exactly as often as tables hold it."""
        counts = [0] * self.num_blocks
        for table in tables:
            for block in table:
                counts[block] += 1
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a block is on the free list twice")
        for block in range(self.num_blocks):
            if counts[block] != self._refs[block]:
                raise AssertionError(f"block {block}: {counts[block]} holders, refcount {self._refs[block]}")
            if (block in free) != (counts[block] == 0):
                raise AssertionError(f"block {block}: free={block in free} but {counts[block]} holders")
