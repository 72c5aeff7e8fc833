"""Prefix caching in the block manager, with no model: full blocks named by their tokens and all
before them, found again by a later sequence, kept while idle and evicted least recently used, and
only when no never-cached block is left."""

from __future__ import annotations

import pytest

from tokenloom.engine.block_manager import BlockManager, OutOfBlocks

BS = 4


def computed(bm: BlockManager, tokens: list[int]) -> tuple[list[int], tuple[int, int]]:
    """A sequence of `tokens` whose KV is all computed (and its full blocks named), as step_done
    leaves it: its table, and (named blocks, last name)."""
    table: list[int] = []
    bm.grow(table, len(tokens))
    return table, bm.name_blocks(table, tokens, 0, 0, len(tokens))


def test_a_later_sequence_finds_the_full_blocks_of_its_prefix_and_nothing_past_a_difference():
    bm = BlockManager(num_blocks=16, block_size=BS, prefix_caching=True)
    first = list(range(10))  # blocks [0..3] [4..7] and a partial one
    table, (named, tail) = computed(bm, first)
    assert named == 2, "only full blocks are named"
    same_start = first[:8] + [99, 98, 97, 96]
    blocks, found = bm.cached_prefix(same_start, len(same_start) - 1)
    assert blocks == table[:2] and found == tail
    assert [bm.refcount(b) for b in blocks] == [2, 2]
    bm.free(blocks)
    differs_in_block_1 = first[:4] + [50] + first[5:]
    blocks, _ = bm.cached_prefix(differs_in_block_1, 9)
    assert blocks == table[:1], "a block is found only with everything before it equal"
    bm.free(blocks)
    same_second_block_other_first = [7] + first[1:]
    assert bm.cached_prefix(same_second_block_other_first, 9) == ([], 0)
    bm.check_invariants([table])


def test_the_lookup_stops_at_max_tokens():
    bm = BlockManager(num_blocks=16, block_size=BS, prefix_caching=True)
    tokens = list(range(12))
    table, _ = computed(bm, tokens)
    blocks, _ = bm.cached_prefix(tokens, 11)  # the last token is always computed: 2 full blocks at most
    assert blocks == table[:2]
    bm.free(blocks)
    assert bm.cached_prefix(tokens, 3) == ([], 0)
    bm.check_invariants([table])


def test_a_freed_named_block_stays_cached_counts_as_free_and_is_found_again():
    bm = BlockManager(num_blocks=4, block_size=BS, prefix_caching=True)
    tokens = list(range(9))
    table, _ = computed(bm, tokens)  # 3 blocks: 2 named, 1 partial
    kept = list(table[:2])
    bm.free(table)
    assert bm.num_free == 4 and bm.num_used == 0 and len(bm.cache) == 2
    bm.check_invariants([])
    blocks, _ = bm.cached_prefix(tokens, 8)
    assert blocks == kept and bm.num_used == 2
    bm.check_invariants([blocks])


def test_never_cached_blocks_go_first_then_the_least_recently_idle_cached_block():
    bm = BlockManager(num_blocks=4, block_size=BS, prefix_caching=True)
    a, _ = computed(bm, [1] * BS)
    b, _ = computed(bm, [2] * BS)
    bm.free(a)  # idle first: evicted first
    bm.free(b)
    fresh: list[int] = []
    bm.grow(fresh, 2 * BS)  # the two never-used blocks
    assert len(bm.cache) == 2, "no cached block was evicted while free ones were left"
    bm.grow(fresh, 3 * BS)
    assert fresh[2] == a[0] if a else True
    assert bm.cached_prefix([1] * BS + [0], BS) == ([], 0), "the oldest idle block was evicted"
    blocks, _ = bm.cached_prefix([2] * BS + [0], BS)
    assert len(blocks) == 1, "the newer one is still there"
    bm.check_invariants([fresh, blocks])


def test_a_held_cached_block_is_never_evicted():
    bm = BlockManager(num_blocks=2, block_size=BS, prefix_caching=True)
    table, _ = computed(bm, [5] * BS)
    other: list[int] = []
    bm.grow(other, BS)
    with pytest.raises(OutOfBlocks):
        bm.grow(other, 2 * BS)
    blocks, _ = bm.cached_prefix([5] * BS + [1], BS)
    assert blocks == table
    bm.check_invariants([table, other, blocks])


def test_a_second_block_with_a_cached_name_stays_unnamed_and_is_freed_as_usual():
    bm = BlockManager(num_blocks=8, block_size=BS, prefix_caching=True)
    tokens = list(range(BS))
    first, first_names = computed(bm, tokens)
    second, second_names = computed(bm, tokens)  # computed beside it, before it was found
    assert second_names == first_names and len(bm.cache) == 1, "the same prefix has the same name"
    bm.free(second)
    assert not bm.cache.holds(second[0] if second else -1)
    bm.check_invariants([first])


def test_without_prefix_caching_nothing_is_named_or_found():
    bm = BlockManager(num_blocks=8, block_size=BS)
    tokens = list(range(9))
    table, named = computed(bm, tokens)
    assert named == (0, 0) and bm.cache is None
    bm.free(table)
    assert bm.cached_prefix(tokens, 8) == ([], 0)
    bm.check_invariants([])


def test_copy_on_write_may_evict_an_idle_cached_block():
    bm = BlockManager(num_blocks=3, block_size=BS, prefix_caching=True)
    cached, _ = computed(bm, [3] * BS)
    bm.free(cached)
    table: list[int] = []
    bm.grow(table, 2)
    shared = bm.fork(table)
    bm.grow(shared, BS + 1)  # takes the last never-used block
    assert bm.num_free == 1 and len(bm.cache) == 1
    src_dst = bm.make_writable(table, 1)
    assert src_dst is not None and len(bm.cache) == 0
    bm.check_invariants([table, shared])
