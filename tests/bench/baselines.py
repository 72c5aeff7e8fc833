"""The same requests through HF transformers alone, same model and dtype, in this process.

- sequential: `generate` one request at a time, each with its own mode (greedy, sampled with its
  temperature / top-p / seed, beam search with its num_beams).
- static: `generate` on left-padded batches of the concurrency size, in arrival order. Each batch
  runs to its longest `max_new_tokens` (`min_new_tokens` keeps EOS from ending it early); a request
  counts only its own `max_new_tokens` as generated, and its tokens are timed as they are streamed,
  which is kinder than a real static server (it would answer when the batch ends). One `generate`
  call takes one decoding mode, so every row runs greedy (beam requests too).
- continuous: transformers' own continuous batching (the manager behind `generate_batch`), driven
  closed loop at the concurrency with per-token timestamps. Its `do_sample` is global and it
  ignores `num_beams`, so every request runs greedy, as in static.

Each run stops taking new requests (or batches) once its time budget is spent; the results say
how many ran, and throughput is over those.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.generation.streamers import BaseStreamer

from process_stats import cpu_seconds
from results import RequestResult
from workload import Request


def load_model(model_dir: Path, device: str = "cpu", dtype: str = "float32"):
    """The model the server runs, on the server's --device in its --dtype."""
    from tokenloom.executor.models import torch_dtype as parse_dtype

    torch_dtype = parse_dtype(dtype)
    if not any(Path(model_dir).glob("*.safetensors")):  # config only: what the server loads with --load-format dummy
        from transformers import AutoConfig

        from tokenloom.executor.models import dummy_model

        model = dummy_model(AutoConfig.from_pretrained(model_dir, local_files_only=True), torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, local_files_only=True)
    return model.to(device).eval()


class _StepTimes(BaseStreamer):
    """Times each decoding step of `generate` (the first `put` is the prompt)."""

    def __init__(self, on_step):
        self.times: list[float] = []
        self._prompt_seen = False
        self._on_step = on_step

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        self._on_step(len(self.times))

    def end(self) -> None:
        pass


def _pad_id(model) -> int:
    pad = model.generation_config.pad_token_id
    return pad if pad is not None else model.generation_config.eos_token_id


@torch.inference_mode()
def warm_up(model, batch_sizes: list[int]) -> None:
    """First-call costs (allocator growth, kernel selection) paid before any timing, per batch size."""
    pad = _pad_id(model)
    for b in sorted(set(batch_sizes)):
        ids = torch.full((b, 16), 1000, device=model.device)
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                       do_sample=False, pad_token_id=pad)


@torch.inference_mode()
def sequential(model, requests: list[Request], budget_s: float, progress) -> tuple:
    pad = _pad_id(model)
    results = []
    t0 = time.perf_counter()
    for req in requests:
        if results and time.perf_counter() - t0 > budget_s:
            break
        ids = torch.tensor([req.prompt_ids], device=model.device)
        n = req.max_new_tokens
        kwargs = {"max_new_tokens": n, "min_new_tokens": n, "pad_token_id": pad, "attention_mask": torch.ones_like(ids)}
        if req.mode == "sampled":
            torch.manual_seed(req.seed)
            kwargs.update(do_sample=True, temperature=req.temperature, top_p=req.top_p)
        elif req.mode == "beam":
            kwargs.update(num_beams=req.num_beams, do_sample=False)
        else:
            kwargs.update(do_sample=False)
        result = RequestResult(req.index, time.perf_counter())
        if req.mode != "beam":  # HF refuses a streamer with beam search: no per-token times then
            kwargs["streamer"] = streamer = _StepTimes(lambda _: progress(1))
        out = model.generate(ids, **kwargs)
        result.end = time.perf_counter()
        result.tokens = out.shape[1] - ids.shape[1]
        if req.mode == "beam":
            progress(result.tokens)
        else:
            result.output_times = streamer.times
        results.append(result)
    return results, t0, time.perf_counter()


@torch.inference_mode()
def static(model, requests: list[Request], batch_size: int, budget_s: float, progress) -> tuple:
    pad = _pad_id(model)
    results = []
    t0 = time.perf_counter()
    for first in range(0, len(requests), batch_size):
        if results and time.perf_counter() - t0 > budget_s:
            break
        batch = requests[first:first + batch_size]
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + list(r.prompt_ids) for r in batch], device=model.device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in batch],
                            device=model.device)
        steps = max(r.max_new_tokens for r in batch)
        start = time.perf_counter()
        lengths = [r.max_new_tokens for r in batch]
        streamer = _StepTimes(lambda step, lengths=lengths: progress(sum(n >= step for n in lengths)))
        model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                       pad_token_id=pad, streamer=streamer)
        end = time.perf_counter()
        for r in batch:
            results.append(RequestResult(r.index, start, streamer.times[:r.max_new_tokens], r.max_new_tokens, end))
    return results, t0, time.perf_counter()


def _warm_up_manager(manager, requests: list[Request]) -> None:
    """The same requests cut to 4 new tokens, all at once, before any timing."""
    ids = [manager.add_request(list(r.prompt_ids), max_new_tokens=4, eos_token_id=-1) for r in requests]
    done = 0
    while done < len(ids):
        out = manager.get_result(timeout=1)
        if out is not None and out.is_finished():
            done += 1
        elif out is None and not manager.is_running():
            raise RuntimeError("transformers' continuous batching loop stopped during its warm-up")


def _cb_config(requests: list[Request], concurrency: int, max_batch_tokens: int):
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    page = getattr(ContinuousBatchingConfig(), "page_size", None) or 256
    longest = max(len(r.prompt_ids) + r.max_new_tokens for r in requests)
    # Enough KV for every stream at its longest: no request waits for memory. (On CPU it would
    # otherwise size the cache from a share of all RAM.)
    num_blocks = concurrency * math.ceil(longest / page) + 8
    return ContinuousBatchingConfig(num_blocks=num_blocks, max_batch_tokens=max_batch_tokens,
                                    max_requests_per_batch=concurrency)


@torch.inference_mode()
def continuous(model_dir: Path, requests: list[Request], concurrency: int, max_batch_tokens: int,
               budget_s: float, progress, device: str = "cpu", dtype: str = "float32") -> tuple:
    """Returns (results, t0, t1, CPU seconds of this process between t0 and t1)."""
    model = load_model(model_dir, device, dtype)  # a model of its own: the manager changes its attention setup
    gen = GenerationConfig(do_sample=False, max_new_tokens=max(r.max_new_tokens for r in requests),
                           eos_token_id=model.generation_config.eos_token_id, pad_token_id=_pad_id(model))
    cfg = _cb_config(requests, concurrency, max_batch_tokens)
    results, by_id = [], {}
    pending = iter(requests)
    with model.continuous_batching_context_manager(generation_config=gen, continuous_batching_config=cfg,
                                                   block=True, timeout=10) as manager:
        _warm_up_manager(manager, requests[:concurrency])
        t0, cpu0 = time.perf_counter(), cpu_seconds()

        def submit() -> bool:
            if time.perf_counter() - t0 > budget_s:
                return False
            for req in pending:
                # eos_token_id=-1: no EOS, so every request runs to its max_new_tokens (ignore_eos).
                rid = manager.add_request(list(req.prompt_ids), max_new_tokens=req.max_new_tokens,
                                          record_timestamps=True, eos_token_id=-1)
                by_id[rid] = req
                return True
            return False

        open_ = sum(submit() for _ in range(concurrency))
        while open_:
            out = manager.get_result(timeout=1)
            if out is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching loop stopped")
                continue
            if not out.is_finished():
                continue
            req = by_id.pop(out.request_id)
            result = RequestResult(req.index, out.created_time, list(out.timestamps or []),
                                   len(out.generated_tokens), time.perf_counter(), out.error or "")
            results.append(result)
            progress(result.tokens)
            open_ -= 1
            open_ += submit()
        t1, cpu1 = time.perf_counter(), cpu_seconds()
    return sorted(results, key=lambda r: r.index), t0, t1, cpu1 - cpu0
