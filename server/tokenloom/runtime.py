"""The loaded model and the engine around it: what `serve` puts behind its fronts, and what the
engine-level tests and benchmarks step by hand."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

from .engine import generation
from .engine.block_manager import BlockManager
from .engine.engine import Engine
from .engine.generation import GenerationContext, TokenText
from .engine.grammar import Grammars
from .engine.scheduler import Scheduler, SchedulerConfig
from .executor import attention, decode_kernel, model_impl
from .executor.kv_cache import KVCache, KVShape
from .executor.model_runner import ModelRunner
from .executor.models import LoadedModel, ModelSpec, load_model
from .fault import FaultPlan
from .front import servicer
from .front.preprocessor import Preprocessor
from .front.validation import Limits
from .metrics import Metrics
from .request import FinishReason, GenerationRequest, SamplingParams, TokenEvent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheConfig:
    kv_cache_tokens: int = 32768  # capacity of the KV store, allocated once at start
    block_size: int = 16
    prefix_caching: bool = True  # full blocks of computed prompts are found again by later requests

    def __post_init__(self):
        if self.block_size < 1 or self.kv_cache_tokens < self.block_size:
            raise ValueError("kv_cache_tokens must be >= block_size >= 1")


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

    def __init__(self, loaded: LoadedModel, cache_cfg: CacheConfig, sched_cfg: SchedulerConfig, limits: Limits):
        model, config = loaded.model, loaded.model.config
        if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
            raise ValueError(f"{loaded.name}: sliding-window attention layers are not supported yet")
        self.loaded = loaded
        self.limits = limits.resolved(config.max_position_embeddings, sched_cfg.max_num_seqs)
        device = next(model.parameters()).device
        num_blocks = cache_cfg.kv_cache_tokens // cache_cfg.block_size
        self.cache = KVCache(KVShape.from_config(config), num_blocks, cache_cfg.block_size, model.dtype, device)
        self.blocks = BlockManager(num_blocks, cache_cfg.block_size, prefix_caching=cache_cfg.prefix_caching)
        self.scheduler = Scheduler(sched_cfg, self.blocks)
        self.seq_ids = itertools.count()  # shared by every engine of this runtime: they share the scheduler
        self.eos_token_ids = eos_ids(model)
        vocab = model.get_output_embeddings().weight.shape[0]  # read before `prepare` takes the weights
        self.model = model_impl.prepare(loaded)
        log.info("model: %s code, quantization %s", self.model.impl, self.model.quantization)
        self.grammars = Grammars(loaded.tokenizer, vocab, limits.max_grammar_size)
        self.preprocessor = Preprocessor(loaded.tokenizer, vocab, self.limits, self.grammars)
        self.served = servicer.ServedModel(
            name=loaded.name,
            model_type=config.model_type,
            context_length=self.limits.context_length,
            vocab_size=vocab,
            eos_token_ids=tuple(sorted(self.eos_token_ids)),
            has_chat_template=bool(getattr(loaded.tokenizer, "chat_template", None)),
            dtype=str(model.dtype).removeprefix("torch."),
            quantization=self.model.quantization,
            device=str(device),
            max_num_seqs=sched_cfg.max_num_seqs,
            kv_cache_tokens=num_blocks * cache_cfg.block_size,
        )
        self.decode_kernel = None
        if loaded.spec.attention_kernel == "auto" and decode_kernel.available(device, model.dtype):
            self.decode_kernel = decode_kernel.load()
        log.info(
            "KV store: %d tokens in %d blocks of %d, %.1f MiB",
            num_blocks * cache_cfg.block_size, num_blocks, cache_cfg.block_size, self.cache.nbytes / 2**20,
        )

    def engine(self, publish, metrics: Metrics | None = None, faults: FaultPlan | None = None, on_exit=None) -> Engine:
        runner = ModelRunner(self.model.model, self.cache, self.cache.kv.device, decode_kernel=self.decode_kernel)
        context = GenerationContext(TokenText(self.loaded.tokenizer), self.eos_token_ids, self.seq_ids, self.grammars)
        start = (faults or FaultPlan()).wrap(generation.start)
        return Engine(runner, self.scheduler, context, publish, metrics=metrics, on_exit=on_exit, start=start)

    def warm_up(self, max_steps: int = 64) -> None:
        """One short generation (a prefill, a decode step, sampling) on a throwaway engine run in
        this thread, so that first-call costs (allocator growth, kernel selection, lazy init) are
        not paid by the first client. Its events and metrics go nowhere; its KV is freed."""
        started = time.monotonic()
        events: list[TokenEvent] = []
        engine = self.engine(events.extend)
        prompt = tuple(range(min(8, self.served.vocab_size)))
        engine.submit(GenerationRequest("warm-up", prompt, SamplingParams(max_new_tokens=2, ignore_eos=True)))
        for _ in range(max_steps):
            engine.run_once()
            if any(event.final for event in events):
                break
        errors = [e.error for e in events if e.finish_reason is FinishReason.ERROR]
        if errors or not any(event.final for event in events):
            raise RuntimeError(f"the warm-up generation failed: {errors[0] if errors else 'it did not finish'}")
        log.info("warm-up generation done in %.2f s", time.monotonic() - started)


def load_runtime(spec: ModelSpec, cache_cfg: CacheConfig, sched_cfg: SchedulerConfig, limits: Limits) -> Runtime:
    loaded = load_model(spec, attn_implementation=attention.register())
    return Runtime(loaded, cache_cfg, sched_cfg, limits)
