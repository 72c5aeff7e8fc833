"""Per-token cost of incremental detokenisation: `python tests/bench/detokenizer_cost.py`.

Encodes a text to TOKENS ids with the default model's tokenizer and feeds them one at a time to a
fresh `IncrementalDetokenizer` (ending with `flush()`), RUNS times; prints the median µs per token
for the DecodeStream path (fast tokenizers) and for the window path (slow tokenizers, forced here by
hiding everything but `decode`), on plain English and on a byte-heavy CJK + emoji text. Run it on a
quiet machine: on a 2-core box another busy process doubles the numbers.
"""

from __future__ import annotations

import argparse
import statistics
import time

ENGLISH = (
    "The river town woke slowly. Fishermen pulled their boats onto the gravel while the baker, "
    "already three hours into his day, stacked loaves in the window. Children ran past the church "
    "with satchels bouncing, late again, and the schoolmaster watched them from the steps with the "
    "patience of a man who had been late himself, forty years before. By noon the market square was "
    "full: cheese from the hill farms, apples, rope, nails, a man selling clocks that did not work. "
)
BYTE_HEAVY = (
    "今天天气很好，我们去公园散步吧！🌳🌞 日本語のテキストも少し🍣🍜。"
    "Ünïcödé façade, naïve café 🎉🥳👩‍👩‍👧‍👦 "
    "한국어 문장도 있습니다. 𝛼𝛽𝛾 ∑∫√ 🚀✨ "
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=512, help="generated ids per sequence (default 512)")
    p.add_argument("--runs", type=int, default=9, help="sequences timed per case (default 9)")
    return p.parse_args(argv)


class _DecodeOnly:
    """The tokenizer seen as a slow one: only `decode`, so the detokenizer takes the window path."""

    def __init__(self, tokenizer):
        self.decode = tokenizer.decode


def _ids(tokenizer, text: str, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(text, add_special_tokens=False)
    return ids[:n]


def us_per_token(tokenizer, ids: list[int], runs: int) -> float:
    from tokenloom.engine.detokenizer import IncrementalDetokenizer

    expected = tokenizer.decode(ids, skip_special_tokens=True)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        detok = IncrementalDetokenizer(tokenizer)
        for i in ids:
            detok.add(i)
        detok.flush()
        samples.append((time.perf_counter() - start) / len(ids) * 1e6)
        if detok.text != expected:
            raise AssertionError("the streamed text differs from the full decode")
    return statistics.median(samples)


def main(argv=None) -> None:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from tokenloom.executor.models import ensure_default_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model(), local_files_only=True)
    print(f"{args.tokens} ids fed one at a time, median of {args.runs} runs, µs per token")
    for name, text in (("English", ENGLISH), ("CJK + emoji", BYTE_HEAVY)):
        ids = _ids(tokenizer, text, args.tokens)
        stream = us_per_token(tokenizer, ids, args.runs)
        window = us_per_token(_DecodeOnly(tokenizer), ids, args.runs)
        print(f"  {name:12s} DecodeStream {stream:7.1f}   window {window:7.1f}")


if __name__ == "__main__":
    main()
