"""Streaming text with the default model's byte-level BPE tokenizer: deltas add up to the full decode.

Multi-byte characters (Chinese, emoji, accents) are split across tokens by byte-level BPE, so a naive
per-token decode would stream U+FFFD; the detokenizer must hold such bytes back until complete.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenloom.engine.detokenizer import IncrementalDetokenizer

REPLACEMENT = "\ufffd"

TEXTS = [
    "Hello, world!",
    "你好，世界！今天天气很好。",
    "🎉🎉 party 🥳 time 👩‍👩‍👧‍👦",
    "café naïve résumé Ångström",
    "mixed 中文 and English\nnew line  double  spaces\n\n\ttab",
    "日本語のテキスト🍣と español ñ",
    "  leading spaces and trailing  ",
    "emoji at the end 🚀",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝛼𝛽𝛾 and ∑∫√",
    "x = [1, 2, 3]\nprint(x)  # comment",
]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from tokenloom.executor.models import ensure_default_model

    return AutoTokenizer.from_pretrained(ensure_default_model())


def stream(tok, ids: list[int]) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    return deltas, detok.flush()


def full_decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_deltas_add_up_to_the_full_decode(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    deltas, rest = stream(tok, ids)
    assert "".join(deltas) + rest == full_decode(tok, ids)
    assert full_decode(tok, ids) == text, "the tokenizer round-trips these texts"


@pytest.mark.parametrize("text", TEXTS)
def test_no_delta_carries_a_broken_character(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    deltas, rest = stream(tok, ids)
    for delta in deltas + [rest]:
        assert REPLACEMENT not in delta, (text, deltas)


def test_multibyte_characters_are_actually_split_across_tokens(tok):
    # Guards the tests above: some of these texts must hit the held-back path.
    ids = tok.encode("你好 🎉", add_special_tokens=False)
    per_token = [tok.decode([i]) for i in ids]
    assert any(REPLACEMENT in piece for piece in per_token)
    deltas, _ = stream(tok, ids)
    assert "" in deltas, "an incomplete character is held back as an empty delta"


def test_text_is_released_as_soon_as_a_character_completes(tok):
    text = "ab 你好 cd"
    ids = tok.encode(text, add_special_tokens=False)
    deltas, rest = stream(tok, ids)
    released = ""
    for i, delta in enumerate(deltas):
        released += delta
        # Everything that decodes cleanly so far has been released: nothing complete is held back.
        prefix = full_decode(tok, ids[: i + 1])
        if REPLACEMENT not in prefix:
            assert released == prefix
    assert rest == ""


def test_special_tokens_produce_no_text(tok):
    assert tok.eos_token_id is not None
    ids = tok.encode("Hi there", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    text = "".join(detok.add(i) for i in ids)
    assert detok.add(tok.eos_token_id) == ""
    for special in tok.all_special_ids:
        assert detok.add(special) == ""
    assert detok.flush() == ""
    assert text == "Hi there"


def test_special_tokens_between_text_are_skipped(tok):
    a = tok.encode("Hello", add_special_tokens=False)
    b = tok.encode(" world", add_special_tokens=False)
    ids = a + [tok.eos_token_id] + b
    deltas, rest = stream(tok, ids)
    assert "".join(deltas) + rest == "Hello world"


def test_special_tokens_are_streamed_when_not_skipped(tok):
    ids = tok.encode("Hi", add_special_tokens=False) + [tok.eos_token_id]
    detok = IncrementalDetokenizer(tok, skip_special_tokens=False)
    out = "".join(detok.add(i) for i in ids) + detok.flush()
    assert out == tok.decode(ids, skip_special_tokens=False)
    assert out.endswith(tok.eos_token)


def test_released_text_is_kept_on_the_detokenizer(tok):
    ids = tok.encode("café 🎉", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    out = "".join(detok.add(i) for i in ids) + detok.flush()
    assert detok.text == out == "café 🎉"


def test_an_empty_stream_flushes_nothing(tok):
    assert IncrementalDetokenizer(tok).flush() == ""


def id_sequences(vocab_size: int, byte_tokens: list[int], added_tokens: list[int]):
    """Random ids, weighted towards single-byte tokens (multi-byte characters split and break)
    and sprinkled with added/special tokens."""
    one_id = st.one_of(
        st.integers(0, vocab_size - 1), st.sampled_from(byte_tokens), st.sampled_from(added_tokens)
    )
    return st.lists(one_id, min_size=1, max_size=24)


@pytest.fixture(scope="module")
def byte_tokens(tok):
    # Byte-level BPE keeps one token per byte; the high bytes are the pieces of multi-byte UTF-8.
    byte_encoder = _bytes_to_unicode()
    ids = [tok.convert_tokens_to_ids(byte_encoder[b]) for b in range(0x80, 0x100)]
    ids = [i for i in ids if i is not None and i != tok.unk_token_id]
    assert len(ids) > 64
    return ids


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def test_random_id_streams_add_up_to_the_full_decode(tok, byte_tokens):
    vocab_size = len(tok)

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(ids=id_sequences(vocab_size, byte_tokens, sorted(tok.added_tokens_decoder)))
    def check(ids):
        deltas, rest = stream(tok, ids)
        full = full_decode(tok, ids)
        assert "".join(deltas) + rest == full
        if REPLACEMENT not in full:
            assert all(REPLACEMENT not in d for d in deltas + [rest])

    check()


def test_random_valid_texts_stream_without_broken_characters(tok):
    chars = st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters=REPLACEMENT)

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(text=st.text(alphabet=chars | st.sampled_from(" \n"), max_size=30))
    def check(text):
        ids = tok.encode(text, add_special_tokens=False)
        deltas, rest = stream(tok, ids)
        full = full_decode(tok, ids)
        assert "".join(deltas) + rest == full
        # Some code points (e.g. unassigned planes) do not survive the tokenizer itself.
        if REPLACEMENT not in full:
            assert all(REPLACEMENT not in d for d in deltas + [rest])

    check()


class LeadingSpaceTokenizer:
    """SentencePiece-like decoding: "▁" is a space, and the decoded text's leading space is dropped.

    With such tokenizers (Llama, Mistral, ...) decoding one token alone loses its space, so the
    detokenizer must decode each new token together with the tokens before it.
    """

    pieces = ["▁Hello", "▁world", ",", "▁how", "▁are", "▁you", "?"]

    def decode(self, ids, skip_special_tokens=True):
        text = "".join(self.pieces[i] for i in ids).replace("▁", " ")
        return text[1:] if text.startswith(" ") else text


def test_spaces_between_words_survive_a_tokenizer_that_strips_the_leading_space():
    tok = LeadingSpaceTokenizer()
    ids = list(range(len(tok.pieces)))
    deltas, rest = stream(tok, ids)
    assert "".join(deltas) + rest == "Hello world, how are you?"
    assert deltas[:2] == ["Hello", " world"], "each word is released with its space as it arrives"
