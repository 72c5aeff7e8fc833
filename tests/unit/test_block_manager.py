"""KV block accounting: allocation, reference-counted sharing and copy-on-write, with no model."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenloom.engine.block_manager import BlockManager, OutOfBlocks


def test_rejects_an_empty_pool():
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=4)
    with pytest.raises(ValueError):
        BlockManager(num_blocks=4, block_size=0)


def test_grow_takes_one_block_per_block_size_tokens_and_free_returns_them():
    bm = BlockManager(num_blocks=10, block_size=4)
    table: list[int] = []
    bm.grow(table, 1)
    assert len(table) == 1 and bm.num_used == 1
    bm.grow(table, 4)  # still fits in the first block
    assert len(table) == 1
    bm.grow(table, 5)
    assert len(table) == 2
    bm.grow(table, 13)
    assert len(table) == 4
    assert len(set(table)) == 4
    assert bm.num_free + bm.num_used == bm.num_blocks
    assert bm.num_free == 6
    bm.check_invariants([table])

    bm.free(table)
    assert table == []
    assert bm.num_free == 10 and bm.num_used == 0
    bm.check_invariants([table])


def test_grow_to_fewer_tokens_than_held_allocates_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    table: list[int] = []
    bm.grow(table, 8)
    before = list(table)
    bm.grow(table, 3)
    assert table == before and bm.num_used == 2


def test_two_tables_never_get_the_same_block():
    bm = BlockManager(num_blocks=8, block_size=2)
    a: list[int] = []
    b: list[int] = []
    bm.grow(a, 7)
    bm.grow(b, 7)
    assert not set(a) & set(b)
    assert bm.num_free == 0
    bm.check_invariants([a, b])


def test_out_of_blocks_leaves_state_unchanged():
    bm = BlockManager(num_blocks=3, block_size=4)
    a: list[int] = []
    b: list[int] = []
    bm.grow(a, 8)  # 2 blocks
    bm.grow(b, 2)  # 1 block; the pool is now empty
    snapshot_b = list(b)
    with pytest.raises(OutOfBlocks):
        bm.grow(b, 9)  # needs 2 more
    assert b == snapshot_b, "a failed grow must not leave a half-grown table"
    assert bm.num_free == 0 and bm.num_used == 3
    bm.check_invariants([a, b])

    # A grow that needs more than is free but less than the pool fails without taking any.
    bm.free(a)
    with pytest.raises(OutOfBlocks):
        bm.grow(b, 4 * 4)  # needs 3 more, 2 free
    assert b == snapshot_b and bm.num_free == 2
    bm.check_invariants([a, b])
    bm.grow(b, 12)  # exactly what is free
    assert bm.num_free == 0
    bm.check_invariants([a, b])


def test_fork_shares_every_block_and_allocates_nothing():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent: list[int] = []
    bm.grow(parent, 10)
    used = bm.num_used
    child = bm.fork(parent)
    assert child == parent and child is not parent
    assert bm.num_used == used
    assert all(bm.refcount(b) == 2 for b in parent)
    bm.check_invariants([parent, child])


def test_freeing_a_fork_keeps_shared_blocks_until_the_last_holder_frees():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent: list[int] = []
    bm.grow(parent, 8)
    shared = list(parent)
    child = bm.fork(parent)
    grandchild = bm.fork(child)
    assert all(bm.refcount(b) == 3 for b in shared)

    bm.free(parent)
    assert bm.num_used == 2, "blocks still held by forks must not return to the free list"
    assert all(bm.refcount(b) == 2 for b in shared)
    bm.check_invariants([parent, child, grandchild])
    # A fresh allocation must not hand out a block a fork still reads.
    other: list[int] = []
    bm.grow(other, 6 * 4)
    assert not set(other) & set(shared)
    bm.free(other)

    bm.free(child)
    assert bm.num_used == 2
    bm.check_invariants([child, grandchild])
    bm.free(grandchild)
    assert bm.num_used == 0 and bm.num_free == 8
    bm.check_invariants([grandchild])


def test_make_writable_copies_only_a_shared_block_and_leaves_the_other_holder_intact():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent: list[int] = []
    bm.grow(parent, 6)  # blocks for positions 0-3 and 4-7; the last one is partial
    child = bm.fork(parent)
    parent_before = list(parent)
    last = parent[1]

    copy = bm.make_writable(child, 5)
    assert copy is not None
    src, dst = copy
    assert src == last
    assert dst not in parent_before
    assert child == [parent_before[0], dst]
    assert parent == parent_before, "copy-on-write must not touch the other holder's table"
    assert bm.refcount(src) == 1 and bm.refcount(dst) == 1
    assert bm.refcount(parent_before[0]) == 2
    assert bm.num_used == 3
    bm.check_invariants([parent, child])

    # The block is private now: writing again needs no copy and takes no block.
    assert bm.make_writable(child, 6) is None
    # The parent is now the sole holder of the old block.
    assert bm.make_writable(parent, 7) is None
    assert bm.num_used == 3
    bm.check_invariants([parent, child])


def test_make_writable_on_a_private_block_returns_none():
    bm = BlockManager(num_blocks=4, block_size=4)
    table: list[int] = []
    bm.grow(table, 3)
    before = list(table)
    assert bm.make_writable(table, 2) is None
    assert table == before and bm.num_used == 1


def test_make_writable_without_a_free_block_raises_and_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    parent: list[int] = []
    bm.grow(parent, 8)
    child = bm.fork(parent)
    with pytest.raises(OutOfBlocks):
        bm.make_writable(child, 7)
    assert child == parent
    assert all(bm.refcount(b) == 2 for b in parent)
    bm.check_invariants([parent, child])


def test_check_invariants_catches_a_held_block_that_is_also_on_the_free_list():
    bm = BlockManager(num_blocks=4, block_size=4)
    table: list[int] = []
    bm.grow(table, 8)
    bm.check_invariants([table])
    bm._free.append(table[0])  # refcount and holders still agree; only the free list is wrong
    with pytest.raises(AssertionError):
        bm.check_invariants([table])


def test_check_invariants_catches_a_table_holding_a_free_block():
    bm = BlockManager(num_blocks=4, block_size=4)
    table: list[int] = []
    bm.grow(table, 4)
    stray = bm._free[0]
    with pytest.raises(AssertionError):
        bm.check_invariants([table + [stray]])


def test_check_invariants_catches_a_block_lost_from_the_free_list():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm._free.pop()  # neither held nor free: it can never be allocated again
    with pytest.raises(AssertionError):
        bm.check_invariants([])


def test_check_invariants_catches_a_wrong_refcount():
    bm = BlockManager(num_blocks=4, block_size=4)
    a: list[int] = []
    bm.grow(a, 4)
    b = list(a)  # shares the block without fork: the refcount says one holder, there are two
    with pytest.raises(AssertionError):
        bm.check_invariants([a, b])


def test_check_invariants_catches_a_leaked_block():
    bm = BlockManager(num_blocks=4, block_size=4)
    table: list[int] = []
    bm.grow(table, 8)
    table.pop()  # dropped from the table without being freed
    with pytest.raises(AssertionError):
        bm.check_invariants([table])


def test_check_invariants_catches_a_block_freed_twice():
    bm = BlockManager(num_blocks=4, block_size=4)
    table: list[int] = []
    bm.grow(table, 4)
    block = table[0]
    bm.free(table)
    bm._free.append(block)
    with pytest.raises(AssertionError):
        bm.check_invariants([])


# Random interleavings of every operation on several tables.

OPS = ("grow", "fork", "write", "free")


def _run_ops(bm: BlockManager, ops: list[tuple[str, int, int]]) -> None:
    """Apply `ops` to a set of tables, checking accounting against an independent model after each."""
    tables: list[list[int]] = [[]]
    lengths = [0]  # tokens each table holds, as its owner would track them
    for name, pick, amount in ops:
        i = pick % len(tables)
        table = tables[i]
        if name == "grow":
            target = lengths[i] + amount
            need = max(0, -(-target // bm.block_size) - len(table))
            free_before, before = bm.num_free, list(table)
            if need > free_before:
                with pytest.raises(OutOfBlocks):
                    bm.grow(table, target)
                assert table == before and bm.num_free == free_before
            else:
                bm.grow(table, target)
                assert table[: len(before)] == before
                assert len(table) == -(-target // bm.block_size) or need == 0
                assert bm.num_free == free_before - need
                lengths[i] = max(lengths[i], target)
        elif name == "fork":
            used = bm.num_used
            tables.append(bm.fork(table))
            lengths.append(lengths[i])
            assert bm.num_used == used
        elif name == "write":
            if lengths[i] == 0:
                continue
            position = amount % lengths[i]
            index = position // bm.block_size
            others = [list(t) for j, t in enumerate(tables) if j != i]
            old = table[index]
            shared = bm.refcount(old) > 1
            if shared and bm.num_free == 0:
                with pytest.raises(OutOfBlocks):
                    bm.make_writable(table, position)
            else:
                copy = bm.make_writable(table, position)
                if shared:
                    assert copy is not None and copy[0] == old and table[index] == copy[1]
                    assert all(copy[1] not in t for t in others)
                else:
                    assert copy is None and table[index] == old
                assert bm.refcount(table[index]) == 1
            assert [t for j, t in enumerate(tables) if j != i] == others
        elif name == "free":
            bm.free(table)
            lengths[i] = 0
            assert table == []
        assert bm.num_free + bm.num_used == bm.num_blocks
        bm.check_invariants(tables)
    for table in tables:
        bm.free(table)
    bm.check_invariants(tables)
    assert bm.num_free == bm.num_blocks


op_strategy = st.tuples(st.sampled_from(OPS), st.integers(0, 50), st.integers(1, 20))


@settings(max_examples=150, deadline=None)
@given(
    num_blocks=st.integers(1, 12),
    block_size=st.integers(1, 5),
    ops=st.lists(op_strategy, max_size=60),
)
def test_random_operations_keep_the_accounting_consistent(num_blocks, block_size, ops):
    _run_ops(BlockManager(num_blocks, block_size), ops)


@pytest.mark.parametrize("seed", range(20))
def test_long_random_runs_keep_the_accounting_consistent(seed):
    rng = random.Random(seed)
    ops = [(rng.choice(OPS), rng.randrange(50), rng.randint(1, 20)) for _ in range(400)]
    _run_ops(BlockManager(rng.randint(4, 32), rng.randint(1, 8)), ops)


def test_a_light_load_keeps_reusing_the_same_blocks():
    """Freed blocks are handed out again first: a store that is mostly idle never touches (and so
    never makes resident) the blocks it does not need."""
    bm = BlockManager(num_blocks=100, block_size=4)
    touched: set[int] = set()
    for round_ in range(50):
        tables = [[] for _ in range(3)]
        for i, table in enumerate(tables):
            bm.grow(table, 4 * (1 + (round_ + i) % 4))  # 1 to 4 blocks each
            touched.update(table)
        for table in tables:
            bm.free(table)
        bm.check_invariants([])
    assert len(touched) <= 12  # at most 3 x 4 blocks at once, out of 100
