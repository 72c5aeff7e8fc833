"""KV block accounting: pure Python, no torch.

The KV store is a fixed pool of blocks of `block_size` token slots. A sequence
owns a block table (a list of block ids). Blocks carry reference counts so that
a sequence can fork (beams sharing their prompt's KV): a fork copies the table
and bumps the counts, and a shared block is copied only when a sharer writes to
it (copy-on-write of the last, partial block).

With prefix caching on, full blocks are also named by their tokens (prefix_cache.py): a new
sequence takes the cached blocks of its longest cached prefix instead of computing them, and a
named block that nobody holds any more stays cached, counted as free, until a block is needed and
no never-named one is left.
"""

from __future__ import annotations

from .prefix_cache import ROOT, PrefixCache


class OutOfBlocks(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # A stack: the most recently freed block is reused first, so a lightly loaded server keeps
        # touching the same few blocks (still in the CPU caches; the rest of the store is never
        # made resident, see kv_cache.py) instead of cycling through all of them. With prefix
        # caching, named blocks go idle in the cache instead, and the stack is used up (untouched
        # blocks included) before any cached block is evicted: the cache keeps as much as the
        # store holds, at the price of the whole store becoming resident over time.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks
        self.cache = PrefixCache() if prefix_caching else None

    @property
    def num_free(self) -> int:
        """Blocks that can take new KV: never-named ones and cached ones nobody holds."""
        return len(self._free) + (self.cache.num_idle if self.cache is not None else 0)

    @property
    def num_used(self) -> int:
        """Blocks some sequence holds."""
        return self.num_blocks - self.num_free

    def _allocate(self) -> int:
        if self._free:
            block = self._free.pop()
        elif self.cache is not None and self.cache.num_idle:
            block = self.cache.evict()
        else:
            raise OutOfBlocks("no free block")
        self._refs[block] = 1
        return block

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks(self, table: list[int], num_tokens: int) -> int:
        """Blocks `table` lacks to hold `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(table))

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Extend `table` in place so that it holds `num_tokens` tokens."""
        need = self.extra_blocks(table, num_tokens)
        if need > self.num_free:
            raise OutOfBlocks(f"need {need} blocks, {self.num_free} free")
        for _ in range(need):
            table.append(self._allocate())

    def free(self, table: list[int]) -> None:
        """Drop one reference to every block of `table` and empty it."""
        for block in table:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if self.cache is not None and self.cache.holds(block):
                    self.cache.set_idle(block)
                else:
                    self._free.append(block)
        table.clear()

    def cached_prefix(self, tokens: list[int], max_tokens: int) -> tuple[list[int], int]:
        """The cached blocks of the longest cached prefix of `tokens` that is at most `max_tokens`
        long, now held by the caller, and the id of the last one's name: ([], ROOT) without
        prefix caching or a hit."""
        blocks: list[int] = []
        parent = ROOT
        if self.cache is None:
            return blocks, parent
        bs = self.block_size
        for i in range(max_tokens // bs):
            found = self.cache.find(parent, tuple(tokens[i * bs:(i + 1) * bs]))
            if found is None:
                break
            block, parent = found
            if self._refs[block] == 0:
                self.cache.take(block)
            self._refs[block] += 1
            blocks.append(block)
        return blocks, parent

    def name_blocks(self, table: list[int], tokens: list[int], named: int, tail: int,
                    num_computed: int) -> tuple[int, int]:
        """Name the full blocks of `table` whose KV is computed (the first `num_computed` tokens)
        past the `named` first ones, whose last name is `tail`; the new (named, tail)."""
        if self.cache is None:
            return named, tail
        bs = self.block_size
        for i in range(named, num_computed // bs):
            tail = self.cache.add(tail, tuple(tokens[i * bs:(i + 1) * bs]), table[i])
            named = i + 1
        return named, tail

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
        new = self._allocate()
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
            idle = self.cache is not None and self.cache.is_idle(block)
            if block in free and idle:
                raise AssertionError(f"block {block} is both free and cached")
            if (block in free or idle) != (counts[block] == 0):
                raise AssertionError(f"block {block}: free={block in free}, idle={idle} but {counts[block]} holders")
        if self.cache is not None:
            self.cache.check_invariants(self._refs)
