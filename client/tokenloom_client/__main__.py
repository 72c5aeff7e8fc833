"""The `tokenloom` CLI: `python -m tokenloom_client "What is the capital of France?"`.

The prompt is sent as one user chat message and the reply streamed to stdout. Beam
search and several sequences print each returned sequence under `[i]` at the end;
`--top-n` adds a table of the likeliest tokens at every step; `--score` prints the
log-probability of a continuation instead of generating.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from .client import DEFAULT_TARGET, Client
from .types import GenerationResult, Hypothesis, ScoreResult, StreamChunk, TopToken, Usage

# argparse destinations named as the proto's GenerationParameters, passed through as is.
_PARAMETERS = ("max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p",
               "seed", "stop_strings", "num_beams", "num_return_sequences", "length_penalty",
               "early_stopping", "no_repeat_ngram_size", "repetition_penalty", "min_new_tokens",
               "min_p", "typical_p", "stop_token_ids", "ignore_eos", "top_n")
_EARLY_STOPPING = {"false": False, "true": True, "never": "never"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tokenloom", description="Generate text with a tokenloom server.")
    p.add_argument("prompt", nargs="?", help="the prompt; read from stdin when omitted")
    p.add_argument("--target", default=os.environ.get("TOKENLOOM_TARGET", DEFAULT_TARGET),
                   help="server address (env TOKENLOOM_TARGET; default %(default)s); several replicas as "
                        "'ip:port,ip:port' or 'dns:///name:port' are balanced, and a broken stream resumes on another")
    p.add_argument("--tls", action="store_true",
                   help="connect over TLS, trusting the system's root certificates (or --ca-cert)")
    p.add_argument("--ca-cert", metavar="PATH", help="PEM root certificate(s) to trust; implies --tls")
    p.add_argument("--token", default=os.environ.get("TOKENLOOM_AUTH_TOKEN"),
                   help="bearer token for a server started with --auth-token (env TOKENLOOM_AUTH_TOKEN)")
    p.add_argument("--raw", action="store_true",
                   help="send the prompt as raw text instead of a chat message")
    p.add_argument("--system", metavar="TEXT", help="a system message before the prompt")
    p.add_argument("--max-new-tokens", type=int, default=256, help="default %(default)s")
    p.add_argument("--max-length", type=int, help="total length, prompt included")
    # None, not False, when absent: unset parameters take the server's defaults.
    p.add_argument("--do-sample", action="store_true", default=None,
                   help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", dest="stop_strings", action="append", metavar="TEXT",
                   help="stop once the text contains TEXT (repeatable)")
    _add_decoding_flags(p)
    p.add_argument("--no-stream", action="store_true", help="wait for the whole reply")
    p.add_argument("--info", action="store_true", help="print model info as JSON and exit")
    p.add_argument("--show-usage", action="store_true",
                   help="print the finish reason and token counts to stderr")
    inspect = p.add_argument_group("inspecting the model")
    inspect.add_argument("--top-n", type=int, metavar="N",
                         help="after the reply, print the N likeliest tokens at every step")
    inspect.add_argument("--score", metavar="CONTINUATION",
                         help="print the log-probability of CONTINUATION after the raw prompt "
                              "text, token by token, instead of generating")
    return p


def _add_decoding_flags(p: argparse.ArgumentParser) -> None:
    """HF `generate` options beyond plain sampling; left out, the server's defaults apply."""
    beams = p.add_argument_group("beam search and several sequences")
    beams.add_argument("--num-beams", type=int, metavar="N", help="N > 1 turns on beam search")
    beams.add_argument("--num-return-sequences", type=int, metavar="N",
                       help="return the N best beams, or N samples with --do-sample")
    beams.add_argument("--length-penalty", type=float, metavar="L",
                       help="beam score = sum of logprobs / length ** L (default 1.0)")
    beams.add_argument("--early-stopping", choices=tuple(_EARLY_STOPPING),
                       help="when beam search stops, as HF's early_stopping (default false)")
    shaping = p.add_argument_group("penalties and stopping")
    shaping.add_argument("--no-repeat-ngram-size", type=int, metavar="N",
                         help="never repeat an n-gram of this size")
    shaping.add_argument("--repetition-penalty", type=float, metavar="P",
                         help="> 1 discourages tokens already seen (default 1.0: off)")
    shaping.add_argument("--min-new-tokens", type=int, metavar="N",
                         help="block EOS until N new tokens")
    shaping.add_argument("--min-p", type=float, metavar="P",
                         help="sampling: drop tokens less likely than P x the likeliest")
    shaping.add_argument("--typical-p", type=float, metavar="P",
                         help="sampling: keep the locally typical tokens of mass P")
    shaping.add_argument("--stop-token-id", dest="stop_token_ids", type=int, action="append",
                         metavar="ID", help="end like EOS at token ID (repeatable)")
    shaping.add_argument("--ignore-eos", action="store_true", default=None,
                         help="do not stop at EOS (benchmarks)")
    constrained = p.add_argument_group("constrained decoding (one of these)")
    one = constrained.add_mutually_exclusive_group()
    one.add_argument("--json-schema", metavar="SCHEMA", help="the reply is JSON valid for SCHEMA (JSON text, or @FILE)")
    one.add_argument("--json-object", action="store_true", help="the reply is a JSON object")
    one.add_argument("--regex", metavar="RE", help="the whole reply matches RE")
    one.add_argument("--grammar", metavar="LARK", help="the reply is a sentence of this Lark grammar (text, or @FILE)")
    one.add_argument("--choice", action="append", metavar="TEXT", help="the reply is one of these (repeatable)")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.raw and args.system:
        parser.error("--system needs a chat prompt; drop --raw")
    if args.score is not None and args.system:
        parser.error("--score scores after the raw prompt text; drop --system")
    try:
        root_certificates = None if args.ca_cert is None else Path(args.ca_cert).read_bytes()
    except OSError as exc:
        parser.error(f"cannot read --ca-cert: {exc}")
    prompt = None if args.info else _read_prompt(args.prompt)
    if prompt is not None and not prompt.strip():
        parser.error("the prompt is empty")
    try:
        with Client(args.target, tls=args.tls, root_certificates=root_certificates,
                    token=args.token or None) as client:
            if args.info:
                print(json.dumps(asdict(client.model_info()), indent=2))
                return 0
            if args.score is not None:
                return _print_score(client.score(prompt, args.score))
            return _generate(client, args, prompt)
    except grpc.RpcError as error:
        return _rpc_failed(error, args.target)
    except KeyboardInterrupt:  # the stream was cancelled on the way out
        return 130


def _read_prompt(argument: str | None) -> str:
    if argument is not None:
        return argument
    if sys.stdin.isatty():
        print("reading the prompt from stdin (Ctrl-D to send)", file=sys.stderr)
    return sys.stdin.read().removesuffix("\n")  # the newline `echo` adds is not prompt


def _constraint(args: argparse.Namespace) -> dict | None:
    def text(value: str) -> str:
        return Path(value[1:]).read_text() if value.startswith("@") else value

    if args.json_schema is not None:
        return {"json_schema": text(args.json_schema)}
    if args.json_object:
        return {"json_object": True}
    if args.regex is not None:
        return {"regex": args.regex}
    if args.grammar is not None:
        return {"grammar": text(args.grammar)}
    if args.choice:
        return {"choice": args.choice}
    return None


def _request(args: argparse.Namespace, prompt: str) -> dict:
    params = {name: getattr(args, name) for name in _PARAMETERS}
    if args.early_stopping is not None:
        params["early_stopping"] = _EARLY_STOPPING[args.early_stopping]
    params["constraint"] = _constraint(args)
    if args.raw:
        return {"prompt": prompt, **params}
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": prompt})
    return {"messages": messages, **params}


def _generate(client: Client, args: argparse.Namespace, prompt: str) -> int:
    request = _request(args, prompt)
    beams = (args.num_beams or 1) > 1
    several = beams or (args.num_return_sequences or 1) > 1
    if args.no_stream:
        result = client.generate(**request)
        if several and result.hypotheses:
            _print_sequences(result.hypotheses, with_scores=beams)
        else:
            print(result.text)
        if args.top_n:
            _print_top_table(_result_steps(result))
        return _finish(args, result.finish_reason, result.usage, result.error_message)
    last, texts, steps = _stream(client, request, beams, several)
    if last is None:
        return _finish(args, None, None, "the server closed the stream without a result")
    if several:
        hypotheses = last.hypotheses or [Hypothesis([], text, 0.0, None)
                                         for _, text in sorted(texts.items())]
        _print_sequences(hypotheses, with_scores=beams and bool(last.hypotheses))
    if args.top_n:
        for index, rows in sorted(steps.items()):
            if len(steps) > 1:
                print(f"[{index}]")
            _print_top_table(rows)
    return _finish(args, last.finish_reason, last.usage, last.error_message)


def _stream(client: Client, request: dict, beams: bool, several: bool,
            ) -> tuple[StreamChunk | None, dict[int, str], dict[int, list[_Step]]]:
    """Shows the stream as it arrives; returns its last chunk, and per index its text and steps.

    One sequence streams its text. Several are printed at the end, whole; meanwhile a
    terminal shows beam search's provisional best on one line (a pipe gets nothing).
    """
    live = beams and sys.stdout.isatty()
    texts: dict[int, str] = defaultdict(str)
    steps: dict[int, list[_Step]] = defaultdict(list)
    last = None
    for last in client.stream(**request):
        steps[last.index].extend(_chunk_steps(last))
        if last.provisional:
            if live and last.hypotheses:
                _show_on_one_line(last.hypotheses[0].text)
        elif several:
            texts[last.index] += last.text
        else:
            sys.stdout.write(last.text)
            sys.stdout.flush()  # show each delta as it arrives, even through a pipe
    if live:
        _show_on_one_line("")
    if not several:
        print()
    return last, texts, steps


def _show_on_one_line(text: str) -> None:
    width = shutil.get_terminal_size().columns - 1
    flat = text.replace("\r", "\\r").replace("\n", "\\n")
    if len(flat) > width:  # the end is what changes: keep it in view
        flat = "\u2026" + flat[len(flat) - width + 1:]
    sys.stdout.write("\r\x1b[K" + flat)  # back to column 0, erase the previous best
    sys.stdout.flush()


def _print_sequences(hypotheses: Sequence[Hypothesis], *, with_scores: bool) -> None:
    for i, h in enumerate(hypotheses):
        print(f"[{i}] score={h.score:.4f} finish={h.finish_reason}" if with_scores else f"[{i}]")
        print(h.text)


@dataclass(frozen=True)
class _Step:
    """One generated position of the --top-n table."""

    token_id: int
    text: str | None  # the chosen token's text, when known
    alternatives: list[TopToken]


def _chunk_steps(chunk: StreamChunk) -> list[_Step]:
    # A one-token chunk's delta is that token's text, unless detokenisation held it back.
    delta = chunk.text if len(chunk.token_ids) == 1 and chunk.text else None
    return [_Step(token_id, delta, alternatives)
            for token_id, alternatives in zip(chunk.token_ids, chunk.top_tokens)]


def _result_steps(result: GenerationResult) -> list[_Step]:
    return [_Step(token_id, None, alternatives)
            for token_id, alternatives in zip(result.token_ids, result.top_tokens)]


def _top_table(steps: Iterable[_Step]) -> list[str]:
    """Lines of: step, chosen token, then `'text' (12.34%)` for choices 1..N."""
    rows = []
    for number, step in enumerate(steps, start=1):
        texts = {t.token_id: t.text for t in step.alternatives}
        chosen = texts.get(step.token_id, step.text)
        rows.append([str(number), repr(chosen) if chosen is not None else f"<id {step.token_id}>",
                     *(f"{t.text!r} ({t.prob:.2%})" for t in step.alternatives)])
    if not rows:
        return []
    n = max(len(row) for row in rows) - 2
    rows.insert(0, ["step", "token", *(f"choice {i}" for i in range(1, n + 1))])
    widths = [max(len(row[c]) for row in rows if c < len(row)) for c in range(n + 2)]
    return ["  ".join(cell.rjust(widths[0]) if c == 0 else cell.ljust(widths[c])
                      for c, cell in enumerate(row)).rstrip() for row in rows]


def _print_top_table(steps: Iterable[_Step]) -> None:
    for line in _top_table(steps):
        print(line)


def _print_score(result: ScoreResult) -> int:
    print(f"prompt: {len(result.prompt_ids)} tokens")
    print(f"{'token_id':>10}  {'logprob':>10}  {'prob':>8}")
    for token_id, logprob in zip(result.continuation_ids, result.logprobs):
        print(f"{token_id:>10}  {logprob:>10.4f}  {math.exp(logprob):>8.2%}")
    print(f"{'total':>10}  {result.total_logprob:>10.4f}")
    return 0


def _finish(args: argparse.Namespace, reason: str | None, usage: Usage | None,
            error_message: str) -> int:
    if args.show_usage:
        counts = (f" prompt_tokens={usage.prompt_tokens} "
                  f"generated_tokens={usage.generated_tokens} cached_tokens={usage.cached_tokens}" if usage else "")
        print(f"finish_reason={reason}{counts}", file=sys.stderr)
    if reason == "error" or reason is None:
        print(f"error: {error_message or 'generation did not finish'}", file=sys.stderr)
        return 1
    return 0


def _rpc_failed(error: grpc.RpcError, target: str) -> int:
    print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
    if error.code() == grpc.StatusCode.UNAVAILABLE:
        print(f"hint: is a server listening at {target}? Start one with `make serve`. "
              "If it speaks TLS, pass --tls (and --ca-cert for a self-signed certificate).",
              file=sys.stderr)
    elif error.code() == grpc.StatusCode.UNAUTHENTICATED:
        print("hint: pass the server's token with --token or TOKENLOOM_AUTH_TOKEN.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
