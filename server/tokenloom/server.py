"""Assembles the parts from configuration and serves them over grpc.aio."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc

from . import attention, servicer
from .block_manager import BlockManager
from .engine import Engine
from .kv_cache import KVCache, KVShape
from .model_runner import ModelRunner
from .models import LoadedModel, ModelSpec, load_model
from .preprocessor import Preprocessor
from .scheduler import Scheduler, SchedulerConfig
from .stream import StreamHub
from .validation import Limits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheConfig:
    kv_cache_tokens: int = 32768  # capacity of the KV store, allocated once at start
    block_size: int = 16

    def __post_init__(self):
        if self.block_size < 1 or self.kv_cache_tokens < self.block_size:
            raise ValueError("kv_cache_tokens must be >= block_size >= 1")


@dataclass(frozen=True)
class LimitsConfig:
    max_new_tokens: int = 4096
    default_max_new_tokens: int = 256
    max_stop_strings: int = 16
    max_stop_string_length: int = 256
    max_num_beams: int = 8
    max_num_return_sequences: int = 8
    max_model_len: int | None = None  # caps the model's own context length


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 50051
    grace_seconds: float = 10.0


def eos_ids(model) -> frozenset[int]:
    """EOS ids as HF `generate` takes them: from the generation config."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = model.config.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


class Runtime:
    """The loaded model and the engine around it, ready to serve."""

    def __init__(self, loaded: LoadedModel, cache_cfg: CacheConfig, sched_cfg: SchedulerConfig, limits_cfg: LimitsConfig):
        model, config = loaded.model, loaded.model.config
        if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
            raise ValueError(f"{loaded.name}: sliding-window attention layers are not supported yet")
        self.loaded = loaded
        context = config.max_position_embeddings
        if limits_cfg.max_model_len:
            context = min(context, limits_cfg.max_model_len)
        self.limits = Limits(
            context_length=context,
            max_new_tokens=limits_cfg.max_new_tokens,
            default_max_new_tokens=limits_cfg.default_max_new_tokens,
            max_stop_strings=limits_cfg.max_stop_strings,
            max_stop_string_length=limits_cfg.max_stop_string_length,
            # A request's beams or samples run in one step: never wider than a step.
            max_num_beams=min(limits_cfg.max_num_beams, sched_cfg.max_num_seqs),
            max_num_return_sequences=min(limits_cfg.max_num_return_sequences, sched_cfg.max_num_seqs),
        )
        device = next(model.parameters()).device
        num_blocks = cache_cfg.kv_cache_tokens // cache_cfg.block_size
        self.cache = KVCache(KVShape.from_config(config), num_blocks, cache_cfg.block_size, model.dtype, device)
        self.blocks = BlockManager(num_blocks, cache_cfg.block_size)
        self.scheduler = Scheduler(sched_cfg, self.blocks)
        self.eos_token_ids = eos_ids(model)
        vocab = model.get_output_embeddings().weight.shape[0]
        self.preprocessor = Preprocessor(loaded.tokenizer, vocab, self.limits)
        self.served = servicer.ServedModel(
            name=loaded.name,
            model_type=config.model_type,
            context_length=context,
            vocab_size=vocab,
            eos_token_ids=tuple(sorted(self.eos_token_ids)),
            has_chat_template=bool(getattr(loaded.tokenizer, "chat_template", None)),
            dtype=str(model.dtype).removeprefix("torch."),
            device=str(device),
            max_num_seqs=sched_cfg.max_num_seqs,
            kv_cache_tokens=num_blocks * cache_cfg.block_size,
        )
        log.info(
            "KV store: %d tokens in %d blocks of %d, %.1f MiB",
            num_blocks * cache_cfg.block_size, num_blocks, cache_cfg.block_size, self.cache.nbytes / 2**20,
        )

    def engine(self, publish) -> Engine:
        runner = ModelRunner(self.loaded.model, self.cache, self.cache.kv.device)
        return Engine(runner, self.scheduler, self.loaded.tokenizer, self.eos_token_ids, publish)


def load_runtime(spec: ModelSpec, cache_cfg: CacheConfig, sched_cfg: SchedulerConfig, limits_cfg: LimitsConfig) -> Runtime:
    loaded = load_model(spec, attn_implementation=attention.register())
    return Runtime(loaded, cache_cfg, sched_cfg, limits_cfg)


def _max_message_bytes(limits: Limits) -> int:
    # Room for a context's worth of ids / text plus protobuf overhead.
    return max(4 * 2**20, 64 * limits.context_length)


async def serve(runtime: Runtime, config: ServerConfig, ready: asyncio.Event | None = None) -> None:
    loop = asyncio.get_running_loop()
    hub = StreamHub(loop)
    engine = runtime.engine(hub.publish)
    hub.engine = engine
    size = _max_message_bytes(runtime.limits)
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]
    )
    servicer.add_to_server(servicer.GenerationServicer(runtime.preprocessor, hub, runtime.served), server)
    address = f"{config.host}:{config.port}"
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"cannot listen on {address}")
    engine.start()
    await server.start()
    log.info("tokenloom serving %s on %s", runtime.served.name, address)
    print(f"tokenloom: serving {runtime.served.name} on {address}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("shutting down: finishing open streams for up to %.0f s", config.grace_seconds)
    await server.stop(config.grace_seconds)
    engine.stop()
