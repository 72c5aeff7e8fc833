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
def default_tokenizer_dir():
    from tokenloom.executor.models import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="module")
def tok(default_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_tokenizer_dir, local_files_only=True)


def stream(tok, ids: list[int], skip_special_tokens: bool = True) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens)
    deltas = [detok.add(i) for i in ids]
    return deltas, detok.flush()


class DecodeOnly:
    """A tokenizer seen as a slow one (only `decode`): the detokenizer takes its Python window path."""

    def __init__(self, tokenizer):
        self.decode = tokenizer.decode


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
        # DecodeStream (Rust) and the window method (Python) release the same text at the same token.
        assert (deltas, rest) == stream(DecodeOnly(tok), ids)

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


# -- DecodeStream (fast tokenizers): the edge cases it brings ----------------------------------------


def test_fast_tokenizers_stream_without_python_decodes(tok, monkeypatch):
    # The point of DecodeStream: per token, no `tokenizer.decode` in Python; one full decode at flush.
    calls = []
    decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda *a, **k: calls.append(a) or decode(*a, **k))
    ids = tok.encode("Hello, 你好 🎉 world", add_special_tokens=False)
    deltas, rest = stream(tok, ids)
    assert "".join(deltas) + rest == "Hello, 你好 🎉 world"
    assert len(calls) == 1


def test_the_first_generated_token_keeps_its_leading_space(tok):
    ids = tok.encode(" Hello world", add_special_tokens=False)
    deltas, rest = stream(tok, ids)
    assert deltas[0] == " Hello"
    assert "".join(deltas) + rest == full_decode(tok, ids) == " Hello world"


def test_end_of_sequence_right_after_a_multibyte_character(tok):
    ids = tok.encode("好🎉", add_special_tokens=False) + [tok.eos_token_id]
    deltas, rest = stream(tok, ids)
    assert deltas[-1] == "" and rest == ""
    assert "".join(deltas) == "好🎉"
    deltas, rest = stream(tok, ids, skip_special_tokens=False)
    assert deltas[-1] == tok.eos_token and "".join(deltas) + rest == "好🎉" + tok.eos_token


def test_a_character_cut_off_by_the_end_is_flushed_as_the_full_decode_shows_it(tok):
    ids = tok.encode("ok 🎉", add_special_tokens=False)[:-1]  # generation stopped mid-character
    deltas, rest = stream(tok, ids)
    assert REPLACEMENT not in "".join(deltas), "held back while it could still complete"
    assert rest.endswith(REPLACEMENT)
    assert "".join(deltas) + rest == full_decode(tok, ids)


def test_ids_past_the_vocabulary_decode_to_nothing(tok):
    # Models may have more rows in the LM head than the tokenizer has ids (Qwen2 pads to 151936).
    past_the_end = [len(tok), 2**32 - 1]
    ids = tok.encode("Hi", add_special_tokens=False) + past_the_end + tok.encode(" you", add_special_tokens=False)
    deltas, rest = stream(tok, ids)
    assert "".join(deltas) + rest == full_decode(tok, ids) == "Hi you"


@pytest.mark.parametrize("bad_id", [-1, 2**32])
def test_an_id_that_cannot_be_a_token_raises_and_changes_nothing(tok, bad_id):
    detok = IncrementalDetokenizer(tok)
    ids = tok.encode("你好 there", add_special_tokens=False)
    out = detok.add(ids[0])
    with pytest.raises(ValueError, match=str(bad_id)):
        detok.add(bad_id)
    out += "".join(detok.add(i) for i in ids[1:]) + detok.flush()
    assert out == detok.text == "你好 there"


def test_the_default_tokenizer_streams_the_same_with_the_cleanup_flag_set(default_tokenizer_dir):
    # transformers skips clean_up_tokenization_spaces for BPE models, so DecodeStream still matches
    # decode; if a version stops skipping it, the Python path must take over and this test says so.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        default_tokenizer_dir, local_files_only=True, clean_up_tokenization_spaces=True
    )
    text = "Hello , world . It 's fine , isn 't it ?"
    ids = tok.encode(text, add_special_tokens=False)
    deltas, rest = stream(tok, ids)
    assert "".join(deltas) + rest == full_decode(tok, ids)


def word_level_tokenizer(vocab: list[str], decoder, **kwargs):
    """A fast (Rust-backed) HF tokenizer over `vocab` with the given Rust decoder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token=vocab[0]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=vocab[0], **kwargs)
    tok.backend_tokenizer.decoder = decoder  # after construction: a custom decoder cannot be copied
    return tok


def test_metaspace_byte_fallback_tokenizer_like_llama_2():
    # Llama 2 / Mistral decoding: "▁" is a space, the text's leading space is dropped, and bytes
    # missing from the vocabulary come as <0x..> tokens.
    from tokenizers import decoders

    vocab = ["<unk>", "</s>", "▁Hello", "▁world", ",", "<0xE4>", "<0xBD>", "<0xA0>", "▁how"]
    decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    tok = word_level_tokenizer(vocab, decoder, eos_token="</s>")
    ids = [2, 3, 4, 5, 6, 7, 8, 1]  # Hello world,你 how</s>
    deltas, rest = stream(tok, ids)
    assert deltas == ["Hello", " world", ",", "", "", "你", " how", ""] and rest == ""
    assert "".join(deltas) == full_decode(tok, ids) == "Hello world,你 how"
    deltas, rest = stream(tok, [5, 6, 1])  # cut off after two of the three bytes of 你
    assert deltas == ["", "", ""] and rest == full_decode(tok, [5, 6, 1]) == REPLACEMENT * 2


def test_python_space_cleanup_is_streamed_as_decode_applies_it():
    # A WordPiece tokenizer whose decode cleans up " ," in Python (the flag), not in its Rust decoder:
    # DecodeStream would stream "hello , world ." and the final decode could not take it back.
    from tokenizers import decoders

    vocab = ["[UNK]", "hello", ",", "world", "."]
    tok = word_level_tokenizer(vocab, decoders.WordPiece(cleanup=False), clean_up_tokenization_spaces=True)
    deltas, rest = stream(tok, [1, 2, 3, 4])
    assert full_decode(tok, [1, 2, 3, 4]) == "hello, world."
    assert deltas == ["hello", ",", " world", "."] and rest == ""


def test_a_decode_overridden_in_python_is_streamed_as_it_decodes():
    # Like CodeGen, CPM or Whisper: the subclass's decode, not the Rust one, is the reference.
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    class Shouting(PreTrainedTokenizerFast):
        def _decode(self, *args, **kwargs):
            return super()._decode(*args, **kwargs).upper()

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "▁hi": 1, "▁there": 2}, unk_token="<unk>"))
    backend.decoder = decoders.Metaspace()
    tok = Shouting(tokenizer_object=backend, unk_token="<unk>")
    deltas, rest = stream(tok, [1, 2])
    assert deltas == ["HI", " THERE"] and rest == ""


class Backspace:
    """A Rust-side custom decoder that rewrites text already decoded: "<bs>" erases the token before."""

    def decode_chain(self, tokens: list[str]) -> list[str]:
        out: list[str] = []
        for t in tokens:
            if t != "<bs>":
                out.append(t)
            elif out:
                out.pop()
        return out + [""] * (len(tokens) - len(out))


def test_a_decoder_that_rewrites_released_text_is_held_back_not_raised():
    # DecodeStream raises "Invalid prefix" here; the stream must go on as the window method does.
    from tokenizers import decoders

    vocab = ["<unk>", "hello", " world", "<bs>", " again", "!"]
    tok = word_level_tokenizer(vocab, decoders.Decoder.custom(Backspace()))
    ids = [1, 2, 3, 4, 5]
    assert full_decode(tok, ids) == "hello again!"
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    rest = detok.flush()
    assert deltas == ["hello", " world", "", "", ""] and rest == ""
    assert detok.text == "hello world", "released text is never taken back"
    assert (deltas, rest) == stream(DecodeOnly(tok), ids)
