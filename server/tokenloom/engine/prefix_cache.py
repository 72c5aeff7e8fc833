"""Full KV blocks found again by their tokens: pure Python, no torch.

A full block is named by its own tokens and the name of the block before it, so a name stands for
the whole prefix up to the block's end: two sequences whose first k * block_size tokens are equal
reach the same k names, and a block's KV depends on nothing else (the model, its dtype and the
block size are fixed per server). Names are exact (dictionary keys of a parent id and a tuple of
token ids), never a hash that could collide: the parent id is a number given to each name when it
is first stored and never reused.

The cache maps names to blocks that hold their KV. A block stays cached after the last sequence
lets it go: it is then *idle*, counted as free by the block manager, and handed out again (its
name dropped) only when no never-cached block is left, least recently idle first.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

ROOT = 0  # the parent id of a sequence's first block

Name = tuple[int, tuple[int, ...]]


class PrefixCache:
    def __init__(self):
        self._blocks: dict[Name, tuple[int, int]] = {}  # name -> (block, its id)
        self._names: dict[int, Name] = {}  # block -> its name
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, oldest first
        self._ids = itertools.count(ROOT + 1)
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._names)

    @property
    def num_idle(self) -> int:
        return len(self._idle)

    def find(self, parent: int, tokens: tuple[int, ...]) -> tuple[int, int] | None:
        """(block, id) holding the KV of `tokens` after the prefix named `parent`, if cached."""
        return self._blocks.get((parent, tokens))

    def add(self, parent: int, tokens: tuple[int, ...], block: int) -> int:
        """Name `block` (whose KV holds `tokens` after prefix `parent`); the name's id. A name
        already cached keeps its block, and `block` stays unnamed."""
        name = (parent, tokens)
        found = self._blocks.get(name)
        if found is not None:
            return found[1]
        if block in self._names:  # a block has one name: its tokens never change while it is held
            raise AssertionError(f"block {block} is cached twice")
        ident = next(self._ids)
        self._blocks[name] = (block, ident)
        self._names[block] = name
        return ident

    def holds(self, block: int) -> bool:
        return block in self._names

    def is_idle(self, block: int) -> bool:
        return block in self._idle

    def set_idle(self, block: int) -> None:
        """The last holder let `block` go: it stays findable until evicted."""
        self._idle[block] = None

    def take(self, block: int) -> None:
        """An idle block is held again."""
        del self._idle[block]

    def evict(self) -> int:
        """Forget the least recently idle block and return it for new KV."""
        block, _ = self._idle.popitem(last=False)
        del self._blocks[self._names.pop(block)]
        self.evictions += 1
        return block

    def check_invariants(self, refs: list[int]) -> None:
        for block in self._idle:
            if block not in self._names or refs[block] != 0:
                raise AssertionError(f"idle block {block} is unnamed or held ({refs[block]} holders)")
        for block in self._names:
            if refs[block] == 0 and block not in self._idle:
                raise AssertionError(f"cached block {block} is held by nobody but not idle")
        if len(self._blocks) != len(self._names):
            raise AssertionError("names and blocks disagree")
