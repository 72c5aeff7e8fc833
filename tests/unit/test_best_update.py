"""Beam progress as edits: the server's `BestUpdate.between` and the SDK's `BestSoFar`, which folds
the edits back, round-trip any sequence of bests, and an edit carries only what changed."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenloom.request import BestUpdate
from tokenloom_client.best_so_far import BestSoFar


def test_a_best_that_grows_by_one_token_sends_only_that_token():
    update = BestUpdate.between((5, 6), "ab", (5, 6, 7), "abc")
    assert update == BestUpdate(keep_tokens=2, token_ids=(7,), keep_text_bytes=2, text_suffix="c")


def test_a_switch_to_another_beam_takes_back_the_tokens_after_the_fork():
    update = BestUpdate.between((5, 6, 7), "a b c", (5, 9, 8, 4), "a x y z")
    assert update == BestUpdate(keep_tokens=1, token_ids=(9, 8, 4), keep_text_bytes=2, text_suffix="x y z")


def test_the_kept_text_is_counted_in_utf8_bytes_and_never_cuts_a_character():
    # "é" and "ê" share their first UTF-8 byte (0xC3): the cut falls before it, not inside it.
    update = BestUpdate.between((1, 2), "né", (1, 3), "nê!")
    assert update.keep_text_bytes == 1 and update.text_suffix == "ê!"
    update = BestUpdate.between((1,), "日本", (1, 2), "日本語")
    assert update.keep_text_bytes == len("日本".encode()) == 6 and update.text_suffix == "語"


def test_the_first_update_starts_from_an_empty_best():
    assert BestUpdate.between((), "", (42,), " Hi") == BestUpdate(0, (42,), 0, " Hi")


def test_the_sdk_rejects_an_edit_that_keeps_more_than_it_holds():
    best = BestSoFar()
    best.update(0, [1, 2], 0, "ab")
    with pytest.raises(ValueError, match="lost or reordered"):
        best.update(3, [4], 2, "c")


def _bests():
    """A run of bests as beam search makes them: each one shares some prefix with the one before."""
    text = st.text(alphabet=st.sampled_from("ab é日\n\ufffd"), max_size=6)
    edit = st.tuples(st.integers(0, 8), st.lists(st.integers(0, 50), max_size=4), st.integers(0, 8), text)
    return st.lists(edit, min_size=1, max_size=30)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(_bests())
def test_folding_the_updates_rebuilds_every_best(edits):
    ids, text = (), ""
    best = BestSoFar()
    for cut_ids, more_ids, cut_text, more_text in edits:
        new_ids, new_text = ids[:cut_ids] + tuple(more_ids), text[:cut_text] + more_text
        update = BestUpdate.between(ids, text, new_ids, new_text)
        assert len(update.token_ids) <= len(more_ids) and len(update.text_suffix) <= len(more_text)
        got = best.update(update.keep_tokens, list(update.token_ids), update.keep_text_bytes, update.text_suffix)
        assert (got.token_ids, got.text) == (list(new_ids), new_text)
        ids, text = new_ids, new_text
