"""When generation ends: EOS, length and stop strings, fed token by token as the engine does."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tokenloom.request import FinishReason
from tokenloom.engine.stopping import check_stop

EOS = 2
EOS_IDS = frozenset({EOS, 7})
PLAIN = 1000  # an ordinary token id


def stop_after(
    text: str,
    new_text_len: int,
    *,
    stop_strings: tuple[str, ...] = (),
    last_token: int = PLAIN,
    num_generated: int = 1,
    max_new_tokens: int = 100,
) -> FinishReason | None:
    return check_stop(
        last_token=last_token,
        num_generated=num_generated,
        max_new_tokens=max_new_tokens,
        eos_token_ids=EOS_IDS,
        text=text,
        new_text_len=new_text_len,
        stop_strings=stop_strings,
    )


def stream(pieces: list[str], stop_strings: tuple[str, ...], max_new_tokens: int = 1000) -> list[FinishReason | None]:
    """check_stop after each token whose text delta is `pieces[i]`, never stopping early."""
    text = ""
    results = []
    for i, piece in enumerate(pieces):
        text += piece
        results.append(stop_after(text, len(piece), stop_strings=stop_strings,
                                  num_generated=i + 1, max_new_tokens=max_new_tokens))
    return results


# EOS and length


def test_eos_token_ends_generation():
    assert stop_after("hello", 0, last_token=EOS) is FinishReason.EOS
    assert stop_after("hello", 0, last_token=7) is FinishReason.EOS, "any of the model's EOS ids counts"


def test_an_ordinary_token_below_the_limit_does_not_stop():
    assert stop_after("hello", 5, num_generated=3, max_new_tokens=4) is None


def test_length_stops_on_the_last_allowed_token_not_before():
    assert stop_after("a", 1, num_generated=3, max_new_tokens=4) is None
    assert stop_after("a", 1, num_generated=4, max_new_tokens=4) is FinishReason.LENGTH


def test_max_new_tokens_of_one_stops_after_the_first_token():
    assert stop_after("a", 1, num_generated=1, max_new_tokens=1) is FinishReason.LENGTH


# Stop strings


def test_stop_string_spanning_tokens_fires_on_the_token_that_completes_it():
    results = stream(["Hel", "lo wo", "rld", "!", " more"], ("world",))
    assert results == [None, None, FinishReason.STOP_STRING, None, None]


def test_stop_string_completed_mid_token_fires():
    # The completing token also carries text after the stop string (HF keeps it in the output too).
    results = stream(["The an", "swer: 42"], ("answer",))
    assert results == [None, FinishReason.STOP_STRING]


def test_stop_string_inside_one_token_fires():
    assert stream(["x", "<END>", "y"], ("<END>",)) == [None, FinishReason.STOP_STRING, None]


def test_stop_string_only_in_old_text_does_not_fire():
    text = "The end. More text"
    assert stop_after(text, len(" text"), stop_strings=("end",)) is None


def test_stop_string_ending_exactly_at_the_old_new_boundary_does_not_fire_again():
    # "end" finished with the previous token; this token only adds ".".
    assert stop_after("the end.", 1, stop_strings=("end",)) is None


def test_no_new_text_means_no_stop_string():
    # The detokenizer held the token's text back (an incomplete character): nothing new to match.
    assert stop_after("the end", 0, stop_strings=("end",)) is None


def test_any_of_several_stop_strings_fires():
    assert stream(["a", "b", "\n\n"], ("###", "\n\n")) == [None, None, FinishReason.STOP_STRING]
    assert stream(["#", "##"], ("###", "\n\n")) == [None, FinishReason.STOP_STRING]


def test_a_second_occurrence_fires_again():
    # Each completing token is reported; the engine stops on the first, but the check is per token.
    assert stream(["ab", "x", "ab"], ("ab",)) == [FinishReason.STOP_STRING, None, FinishReason.STOP_STRING]


def test_non_ascii_stop_string_across_tokens():
    assert stream(["你", "好", "世", "界"], ("好世",)) == [None, None, FinishReason.STOP_STRING, None]


def test_without_stop_strings_text_is_ignored():
    assert stop_after("world", 5, stop_strings=()) is None


# Precedence: EOS, then stop string, then length


def test_eos_wins_over_a_stop_string_completed_by_the_same_token():
    assert stop_after("world", 2, stop_strings=("world",), last_token=EOS) is FinishReason.EOS


def test_eos_wins_over_length():
    assert stop_after("a", 1, last_token=EOS, num_generated=5, max_new_tokens=5) is FinishReason.EOS


def test_stop_string_wins_over_length_on_the_last_token():
    assert stop_after("world", 2, stop_strings=("world",), num_generated=5, max_new_tokens=5) is (
        FinishReason.STOP_STRING
    )


# Against an independent oracle


def _fires(old: str, new: str, stop: str) -> bool:
    """Whether an occurrence of `stop` in old+new ends inside `new`."""
    text = old + new
    return any(
        text.startswith(stop, i) and i + len(stop) > len(old) for i in range(len(text) - len(stop) + 1)
    )


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.text(alphabet="ab", min_size=0, max_size=4), min_size=1, max_size=12),
    stops=st.lists(st.text(alphabet="ab", min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_stop_strings_fire_exactly_when_an_occurrence_ends_in_the_new_text(pieces, stops):
    results = stream(pieces, tuple(stops))
    old = ""
    for piece, result in zip(pieces, results):
        expected = any(_fires(old, piece, s) for s in stops)
        assert (result is FinishReason.STOP_STRING) == expected, (old, piece, stops)
        old += piece
    # The first firing token is the first at which the accumulated text contains a stop string.
    first = next((i for i, r in enumerate(results) if r is not None), None)
    first_containing = next(
        (i for i in range(len(pieces)) if any(s in "".join(pieces[: i + 1]) for s in stops)), None
    )
    assert first == first_containing
