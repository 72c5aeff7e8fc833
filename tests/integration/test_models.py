"""tokenloom.models: tiny models of each architecture, load errors, the cache lock, the default model."""

import threading
import time

import pytest
import torch
from transformers import T5Config

import tokenloom.executor.models as models
from tiny_models import KINDS, build_tiny_model, default_model_dir
from tokenloom.executor.models import DEFAULT_MODEL, ModelSpec, ensure_default_model, load_model

QUIET = {"log": lambda message: None}


@pytest.fixture(scope="module")
def tokenizer_dir():
    return default_model_dir()


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_model_loads_and_gives_full_vocab_logits(kind, tmp_path, tokenizer_dir):
    path = build_tiny_model(kind, tmp_path / kind, tokenizer_dir=tokenizer_dir)
    loaded = load_model(ModelSpec(path=str(path)), **QUIET)
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits
    assert loaded.model.config.model_type == kind
    assert not loaded.model.training
    assert logits.shape == (1, ids.shape[1], len(loaded.tokenizer))
    assert loaded.model.generation_config.eos_token_id == loaded.tokenizer.eos_token_id


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_model_is_reproducible_and_not_near_tied(kind, tmp_path, tokenizer_dir):
    ids = torch.randint(0, 49152, (4, 32), generator=torch.Generator().manual_seed(0))
    logits = []
    for name in ("a", "b"):
        path = build_tiny_model(kind, tmp_path / name, tokenizer_dir=tokenizer_dir, seed=3)
        with torch.no_grad():
            logits.append(load_model(ModelSpec(path=str(path)), **QUIET).model(input_ids=ids).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)
    top2 = logits[0].topk(2, dim=-1).values  # [4, 32, 2]
    assert (top2[..., 0] - top2[..., 1]).median() > 0.05


def test_dtype_is_applied_and_auto_keeps_the_checkpoint(tmp_path, tokenizer_dir):
    path = str(build_tiny_model("llama", tmp_path / "m", tokenizer_dir=tokenizer_dir))
    assert load_model(ModelSpec(path=path, dtype="bfloat16"), **QUIET).model.dtype == torch.bfloat16
    assert load_model(ModelSpec(path=path, dtype="auto"), **QUIET).model.dtype == torch.float32


def _config_only(path):
    for weights in path.glob("*.safetensors"):
        weights.unlink()
    return path


def test_dummy_load_format_builds_the_seeded_architecture_from_config_alone(tmp_path, tokenizer_dir):
    checkpoint = build_tiny_model("qwen2", tmp_path / "ckpt", tokenizer_dir=tokenizer_dir, seed=0)
    config_only = _config_only(build_tiny_model("qwen2", tmp_path / "cfg", tokenizer_dir=tokenizer_dir, seed=5))
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)
    before = torch.rand(3)
    with torch.no_grad():
        dummies = [load_model(ModelSpec(path=str(config_only), load_format="dummy"), **QUIET) for _ in range(2)]
        logits = [d.model(input_ids=ids).logits for d in dummies]
        reference = load_model(ModelSpec(path=str(checkpoint)), **QUIET).model(input_ids=ids).logits
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), before)  # the caller's random stream is left alone
    assert "dummy" in dummies[0].name
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)
    # Seed 0 and the same config: the very weights a checkpoint built from seed 0 holds.
    torch.testing.assert_close(logits[0], reference, rtol=0, atol=0)


def test_a_directory_without_weights_names_the_dummy_format(tmp_path, tokenizer_dir):
    path = _config_only(build_tiny_model("llama", tmp_path / "m", tokenizer_dir=tokenizer_dir))
    with pytest.raises(ValueError, match="no weights.*--load-format dummy"):
        load_model(ModelSpec(path=str(path)), **QUIET)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist.*local"):
        load_model(ModelSpec(path=str(tmp_path / "nope")), **QUIET)


def test_unknown_dtype_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown dtype 'fp8'.*float32"):
        load_model(ModelSpec(path=str(tmp_path), dtype="fp8"), **QUIET)


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_model(ModelSpec(path=str(tmp_path)), **QUIET)


def test_encoder_decoder_is_refused(tmp_path):
    T5Config(vocab_size=128, d_model=16, num_layers=1, num_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="encoder-decoder.*decoder-only"):
        load_model(ModelSpec(path=str(tmp_path)), **QUIET)


def test_concurrent_first_starts_convert_once(tmp_path, monkeypatch):
    calls = []

    def fake_convert(gguf, out, log):
        calls.append(out)
        time.sleep(0.3)  # long enough that every thread arrives while the first converts
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    stale = tmp_path / f".{DEFAULT_MODEL}-fp32.tmp-dead"
    stale.mkdir()
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_default_model(tmp_path, **QUIET)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert len(set(results)) == 1 and len(results) == 4
    assert (results[0] / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if "tmp" in p.name) == []


@pytest.mark.slow
def test_default_model_answers_the_capital_of_france():
    loaded = load_model(ModelSpec(), **QUIET)
    tokenizer = loaded.tokenizer
    assert loaded.name == DEFAULT_MODEL
    assert loaded.model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = loaded.model.generate(**inputs, do_sample=False, max_new_tokens=20)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text
    assert text.strip() == "The capital of France is Paris."
