"""`python -m tokenloom`: parse flags into the config dataclasses and serve."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from .front.admission import QUEUED_REQUESTS_PER_SEQ, AdmissionConfig
from .front.stream import StreamConfig
from .front.validation import Limits
from .engine.engine_thread import EngineThread
from .fault import FaultPlan
from .metrics import MetricsConfig
from .executor.models import ModelSpec
from .engine.scheduler import SchedulerConfig
from .front.clients import TokensFile
from .runtime import CacheConfig, load_runtime
from .server import ListenError, ServerConfig, serve


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tokenloom", description="Serve a causal LM over gRPC (and OpenAI-compatible HTTP) with continuous batching.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("network")
    g.add_argument("--host", default="0.0.0.0", help="address to listen on")
    g.add_argument("--port", type=int, default=50051, help="gRPC port")
    g.add_argument("--http-port", type=int, default=8080,
                   help="OpenAI-compatible HTTP API and the decoding explorer page (on --host); 0 disables")
    g.add_argument("--grace-seconds", type=float, default=10.0,
                   help="on SIGTERM/SIGINT, time open streams get to finish; those still open then get UNAVAILABLE, "
                        "and the process exits within a second")
    g.add_argument("--max-connection-age", type=float, default=0.0,
                   help="seconds after which a gRPC connection is asked to reconnect (GOAWAY; its calls finish "
                        "first), so that long-lived clients re-resolve and reach replicas added since; 0: never")
    g.add_argument("--stream-buffer", type=int, default=64,
                   help="messages a stream may hold for a client that does not read before its rows pause")
    g.add_argument("--stream-idle-timeout", type=float, default=60.0,
                   help="seconds a client may leave a waiting message unread before its stream is cut (0: never)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="default",
                   help="local HF model directory, or 'default' for the embedded SmolLM2-135M-Instruct")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    g.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model directory")
    g.add_argument("--linear-kernel", default="auto", choices=["auto", "torch"],
                   help="auto: prepacked oneDNN linear layers on CPU fp32; torch: the model's own F.linear")
    g.add_argument("--attention-kernel", default="auto", choices=["auto", "torch"],
                   help="auto: decode attention read straight from the paged KV store by a C++ kernel on CPU "
                        "fp32 (built once per machine); torch: block gather + SDPA")
    g.add_argument("--model-impl", default="auto", choices=["auto", "native", "hf"],
                   help="native: tokenloom's own model code (Llama, Mistral, Qwen2, GPT-2); hf: transformers' "
                        "modules; auto: native where it exists for the model type")
    g.add_argument("--quantization", default="auto", choices=["auto", "none", "gguf", "q4_0", "q4_1", "q8_0"],
                   help="weight format of the linear layers (native code, CPU, float32): gguf serves the embedded "
                        "model's GGUF blocks as they are; q4_0/q4_1/q8_0 quantize a dense checkpoint at load; "
                        "auto: gguf for the default model, none otherwise")
    g.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="auto: the checkpoint's weights; dummy: only --model's config.json and tokenizer, with "
                        "random weights (seeded), to benchmark model sizes without their checkpoints")
    g.add_argument("--cache-dir", default=None, help="where the converted default model is kept "
                   "(default: $TOKENLOOM_CACHE_DIR or ~/.cache/tokenloom)")
    g = p.add_argument_group("engine")
    g.add_argument("--kv-cache-tokens", type=int, default=32768, help="KV store capacity in tokens, allocated once")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--no-prefix-caching", action="store_true",
                   help="compute every prompt in full instead of reusing the KV of prefixes computed before")
    g.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one engine step")
    g.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="tokens computed per step; longer prompts are prefilled in chunks of what is left")
    g.add_argument("--schedule-policy", default="prefill-first", choices=["prefill-first", "decode-first"],
                   help="prefill-first: a step with prompts waiting computes only prompts (decoders wait that one "
                        "step, never two in a row): lower time to first token; decode-first: decode rows always "
                        "run and prompts get the budget they leave: steadier inter-token latency")
    g = p.add_argument_group("limits")
    g.add_argument("--max-model-len", type=int, default=None, help="cap the context length below the model's")
    g.add_argument("--max-new-tokens-limit", type=int, default=4096, help="largest max_new_tokens a request may ask")
    g.add_argument("--default-max-new-tokens", type=int, default=256,
                   help="used when a request sets neither max_new_tokens nor max_length")
    g.add_argument("--max-stop-strings", type=int, default=16)
    g.add_argument("--max-stop-string-length", type=int, default=256)
    g.add_argument("--max-num-beams", type=int, default=8, help="largest num_beams (capped at --max-num-seqs)")
    g.add_argument("--max-num-return-sequences", type=int, default=8,
                   help="largest num_return_sequences (capped at --max-num-seqs)")
    g.add_argument("--max-constraint-bytes", type=int, default=65536,
                   help="largest JSON schema, regex or grammar a request's constraint may carry")
    g.add_argument("--max-grammar-size", type=int, default=200_000,
                   help="what one constraint may compile to (grammar symbols); a bigger one is refused at once")
    g = p.add_argument_group("metrics")
    g.add_argument("--metrics-port", type=int, default=8000, help="Prometheus /metrics over HTTP; 0 disables")
    g.add_argument("--metrics-host", default="0.0.0.0", help="address the metrics endpoint listens on")
    _admission_flags(p)
    g = p.add_argument_group("security", "TLS and a bearer token; without them the server is plaintext and open")
    g.add_argument("--tls-cert", metavar="PATH", help="PEM certificate chain; with --tls-key the server speaks TLS")
    g.add_argument("--tls-key", metavar="PATH", help="PEM private key of --tls-cert")
    g.add_argument("--auth-token", default=None,
                   help="require metadata 'authorization: Bearer <token>' on every RPC but health and "
                        "reflection (default: $TOKENLOOM_AUTH_TOKEN if set; else no authentication); visible in "
                        "`ps`: prefer --auth-token-file")
    g.add_argument("--auth-token-file", metavar="PATH", default=None,
                   help="as --auth-token, the token read from PATH (surrounding whitespace stripped)")
    g.add_argument("--auth-tokens-file", metavar="PATH", default=None,
                   help="a JSON file of tokens, each naming its client id (the client admission counts) and "
                        "optionally its own max_streams and rate_limit; reloaded on SIGHUP (docs/operations.md)")
    p.add_argument("--inject-fault", action="append", metavar="KIND=SEED", default=None,
                   help="FOR TESTS ONLY: make requests with this sampling seed fail; KIND is sample-error "
                        "(their own step raises after 2 tokens) or engine-death (admitting one kills the engine)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="INFO logs one line per finished request (logger tokenloom.requests)")
    return p


# At the end of a help string: keeps ArgumentDefaultsHelpFormatter from adding "(default: None)" to a
# flag whose default the help states in words (it adds none to a help that mentions %(default)).
_NO_DEFAULT_SHOWN = "%(default).0s"


def _admission_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("admission", "over a limit a request gets RESOURCE_EXHAUSTED naming the limit and "
                             "when to retry; 0 turns a limit off")
    g.add_argument("--rate-limit-per-client", type=int, default=0,
                   help="requests a client may start per --rate-limit-period (sliding window)")
    g.add_argument("--rate-limit-period", type=float, default=1.0, help="seconds")
    g.add_argument("--max-streams-per-client", type=int, default=0, help="requests a client may have open at once")
    g.add_argument("--max-queued-requests", type=int, default=None,
                   help="requests admitted and still waiting for their first token, over all clients (default: "
                        f"{QUEUED_REQUESTS_PER_SEQ} x --max-num-seqs){_NO_DEFAULT_SHOWN}")
    g.add_argument("--max-queued-prompt-tokens", type=int, default=None,
                   help="prompt tokens of those requests; a longer prompt is admitted into an empty queue "
                        f"(default: the KV store's capacity, --kv-cache-tokens){_NO_DEFAULT_SHOWN}")
    g.add_argument("--max-queue-wait", type=float, default=60.0, metavar="SECONDS",
                   help="a request still without its first token this long after admission is ended with "
                        "RESOURCE_EXHAUSTED and a retry hint, and leaves the engine")
    g.add_argument("--client-id-metadata-key", default="x-client-id",
                   help="gRPC metadata key naming the client, read only with --trust-client-id-metadata")
    g.add_argument("--trust-client-id-metadata", action="store_true",
                   help="take the client id from --client-id-metadata-key when a call has it (for a proxy in front "
                        "that sets it); else the client is the peer's host, or the token's client with "
                        "--auth-tokens-file (which never reads the key)")


def auth_token(flag: str | None, environ=os.environ, path: str | None = None) -> str | None:
    """--auth-token or --auth-token-file (not both) win over TOKENLOOM_AUTH_TOKEN; an empty environment
    variable counts as unset. Raises ValueError for a file that cannot be read or holds no token."""
    if path is not None:
        if flag is not None:
            raise ValueError("--auth-token and --auth-token-file exclude each other: give one")
        try:
            flag = Path(path).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the token file (--auth-token-file): {exc}") from None
        if not flag:
            raise ValueError(f"the token file {path} (--auth-token-file) is empty")
    return flag if flag is not None else environ.get("TOKENLOOM_AUTH_TOKEN") or None


def server_config(args: argparse.Namespace) -> ServerConfig:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together: give both for TLS, or neither for plaintext")
    try:
        cert, key = (None, None) if args.tls_cert is None else (
            Path(args.tls_cert).read_bytes(), Path(args.tls_key).read_bytes())
    except OSError as exc:
        raise ValueError(f"cannot read the TLS certificate or key: {exc}") from exc
    if args.auth_tokens_file is not None:
        if args.auth_token is not None or args.auth_token_file is not None:
            raise ValueError("--auth-tokens-file excludes --auth-token and --auth-token-file: give one")
        TokensFile(args.auth_tokens_file)  # read once here, so that a bad file stops us before the model loads
        token = None  # $TOKENLOOM_AUTH_TOKEN does not apply: the file names every token
    else:
        token = auth_token(args.auth_token, path=args.auth_token_file)
    return ServerConfig(args.host, args.port, args.grace_seconds, tls_cert_chain=cert, tls_private_key=key,
                        auth_token=token, auth_tokens_file=args.auth_tokens_file, http_port=args.http_port,
                        max_connection_age=args.max_connection_age,
                        stream=StreamConfig(args.stream_buffer, args.stream_idle_timeout))


def runtime_configs(args: argparse.Namespace) -> tuple[ModelSpec, CacheConfig, SchedulerConfig, Limits]:
    """What `load_runtime` takes, from the flags (the bench builds its engine-only runs with it too)."""
    spec = ModelSpec(
        path=None if args.model == "default" else args.model, device=args.device, dtype=args.dtype,
        trust_remote_code=args.trust_remote_code, cache_dir=args.cache_dir, linear_kernel=args.linear_kernel,
        attention_kernel=args.attention_kernel, load_format=args.load_format, model_impl=args.model_impl,
        quantization=args.quantization,
    )
    cache_cfg = CacheConfig(kv_cache_tokens=args.kv_cache_tokens, block_size=args.block_size,
                            prefix_caching=not args.no_prefix_caching)
    sched_cfg = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                policy=args.schedule_policy)
    limits = Limits(
        max_new_tokens=args.max_new_tokens_limit, default_max_new_tokens=args.default_max_new_tokens,
        max_stop_strings=args.max_stop_strings, max_stop_string_length=args.max_stop_string_length,
        max_model_len=args.max_model_len, max_num_beams=args.max_num_beams,
        max_num_return_sequences=args.max_num_return_sequences, max_constraint_bytes=args.max_constraint_bytes,
        max_grammar_size=args.max_grammar_size,
    )
    return spec, cache_cfg, sched_cfg, limits


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server_cfg = server_config(args)
        metrics_cfg = MetricsConfig(port=args.metrics_port, host=args.metrics_host)
        admission_cfg = AdmissionConfig(
            rate_limit_per_client=args.rate_limit_per_client, rate_limit_period=args.rate_limit_period,
            max_streams_per_client=args.max_streams_per_client, max_queued_requests=args.max_queued_requests,
            max_queued_prompt_tokens=args.max_queued_prompt_tokens, max_queue_wait=args.max_queue_wait,
            client_id_metadata_key=args.client_id_metadata_key,
            trust_client_id_metadata=args.trust_client_id_metadata,
        )
        faults = FaultPlan.parse(args.inject_fault)
        # Every torch op of the process runs on the engine's thread, the load included (engine_thread.py).
        engine_thread = EngineThread()
        runtime = engine_thread.call(load_runtime, *runtime_configs(args))
    except ValueError as exc:
        print(f"tokenloom: {exc}", file=sys.stderr)
        return 2
    if faults.active:
        logging.getLogger("tokenloom").warning("fault injection is on (%s): a test setting, never for serving", faults)
    try:
        asyncio.run(serve(runtime, server_cfg, engine_thread, metrics_cfg=metrics_cfg,
                          admission_cfg=admission_cfg, faults=faults))
    except ListenError as exc:
        print(f"tokenloom: {exc}", file=sys.stderr)
        return 1
    _exit_now(0)


def _exit_now(code: int) -> None:
    """Served and drained: exit without the interpreter's finalisation. Its module teardown and full
    garbage collection over torch's and transformers' objects take seconds on a busy machine (2-3 s
    measured on the 2-core one), have nothing left to release, and would break the promise that
    the process is gone within --grace-seconds plus one second of a SIGTERM."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
