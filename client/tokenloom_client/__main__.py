"""The `tokenloom` CLI: `python -m tokenloom_client "What is the capital of France?"`.

The prompt is sent as one user chat message and the reply streamed to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

import grpc

from .client import DEFAULT_TARGET, Client
from .types import Usage

# argparse destinations named as the proto's GenerationParameters, passed through as is.
_PARAMETERS = ("max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p",
               "seed", "stop_strings")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tokenloom", description="Generate text with a tokenloom server.")
    p.add_argument("prompt", nargs="?", help="the prompt; read from stdin when omitted")
    p.add_argument("--target", default=os.environ.get("TOKENLOOM_TARGET", DEFAULT_TARGET),
                   help="server address (env TOKENLOOM_TARGET; default %(default)s)")
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
    p.add_argument("--no-stream", action="store_true", help="wait for the whole reply")
    p.add_argument("--info", action="store_true", help="print model info as JSON and exit")
    p.add_argument("--show-usage", action="store_true",
                   help="print the finish reason and token counts to stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.raw and args.system:
        parser.error("--system needs a chat prompt; drop --raw")
    prompt = None if args.info else _read_prompt(args.prompt)
    if prompt is not None and not prompt.strip():
        parser.error("the prompt is empty")
    try:
        with Client(args.target) as client:
            if args.info:
                print(json.dumps(asdict(client.model_info()), indent=2))
                return 0
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


def _request(args: argparse.Namespace, prompt: str) -> dict:
    params = {name: getattr(args, name) for name in _PARAMETERS}
    if args.raw:
        return {"prompt": prompt, **params}
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": prompt})
    return {"messages": messages, **params}


def _generate(client: Client, args: argparse.Namespace, prompt: str) -> int:
    request = _request(args, prompt)
    if args.no_stream:
        result = client.generate(**request)
        print(result.text)
        return _finish(args, result.finish_reason, result.usage, result.error_message)
    last = None
    for last in client.stream(**request):
        sys.stdout.write(last.text)
        sys.stdout.flush()  # show each delta as it arrives, even through a pipe
    print()
    if last is None:
        return _finish(args, None, None, "the server closed the stream without a result")
    return _finish(args, last.finish_reason, last.usage, last.error_message)


def _finish(args: argparse.Namespace, reason: str | None, usage: Usage | None,
            error_message: str) -> int:
    if args.show_usage:
        counts = (f" prompt_tokens={usage.prompt_tokens} "
                  f"generated_tokens={usage.generated_tokens}" if usage else "")
        print(f"finish_reason={reason}{counts}", file=sys.stderr)
    if reason == "error" or reason is None:
        print(f"error: {error_message or 'generation did not finish'}", file=sys.stderr)
        return 1
    return 0


def _rpc_failed(error: grpc.RpcError, target: str) -> int:
    print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
    if error.code() == grpc.StatusCode.UNAVAILABLE:
        print(f"hint: is a server listening at {target}? Start one with `make serve`.",
              file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
