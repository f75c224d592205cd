"""Built-in checkpoints: deterministic bytes, loadable by transformers and by our loader."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from pdserve.engine.attention.torch_backend import TorchAttentionBackend
from pdserve.engine.model.builtin import BUILTINS, builtin_checkpoint, resolve_model
from pdserve.engine.model.loader import CheckpointError, load_model
from tests.checkpoints import decode_meta, new_cache, prefill_meta

FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return builtin_checkpoint("tiny", tmp_path_factory.mktemp("builtin"))


def test_tiny_is_byte_identical_when_built_twice(tiny: Path, tmp_path: Path) -> None:
    again = builtin_checkpoint("tiny", tmp_path)
    assert again != tiny
    assert {p.name for p in tiny.iterdir()} == FILES
    for name in FILES:
        assert (again / name).read_bytes() == (tiny / name).read_bytes(), name


def test_second_call_reuses_the_folder(tiny: Path) -> None:
    mtime = (tiny / "model.safetensors").stat().st_mtime_ns
    assert builtin_checkpoint("tiny", tiny.parent) == tiny
    assert (tiny / "model.safetensors").stat().st_mtime_ns == mtime


def test_concurrent_builders_agree_and_leave_no_temp_dirs(tmp_path: Path) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(builtin_checkpoint("tiny", tmp_path))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]
    load_model(results[0], "float32", "cpu")


@torch.no_grad()
def test_tiny_loads_in_transformers_and_logits_match_ours(tiny: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny, local_files_only=True)
    ref = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    model = load_model(tiny, "float32", "cpu")
    assert len(tok) == model.config.vocab_size == BUILTINS["tiny"].vocab_size
    assert model.config.eos_token_ids == (tok.eos_token_id,)

    ids = torch.tensor(tok.encode("The quick brown fox jumps over the lazy dog. Grüße 😀 42"))
    n = len(ids) - 1
    expected = ref(ids[None]).logits[0].log_softmax(-1)
    backend, cache = TorchAttentionBackend(), new_cache(model)
    hidden = model(ids[:n], torch.arange(n), cache, prefill_meta(n), backend)
    assert (model.compute_logits(hidden).log_softmax(-1) - expected[:n]).abs().max() < 1e-3
    hidden = model(ids[n:], torch.tensor([n]), cache, decode_meta(n), backend)
    assert (model.compute_logits(hidden).log_softmax(-1) - expected[n:]).abs().max() < 1e-3


@torch.no_grad()
def test_tiny_greedy_steps_are_not_near_ties(tiny: Path) -> None:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    prompt = torch.tensor([[0, 74, 71, 78, 315, 223, 89, 81, 84, 78, 70]])
    out = ref.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=100,
        do_sample=False,
        eos_token_id=None,
    )
    top2 = ref(out).logits[0, prompt.shape[1] - 1 : -1].topk(2, dim=-1).values
    gaps = top2[:, 0] - top2[:, 1]
    assert gaps.min() > 0.01  # fp32 engines (~1e-5 apart) cannot flip
    assert (gaps > 0.1).float().mean() > 0.95


def test_small_spec_has_50_to_100m_parameters_and_supported_head_dim() -> None:
    s = BUILTINS["small"]
    q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    layer = s.hidden_size * (2 * q + 2 * kv) + 3 * s.hidden_size * s.intermediate_size
    params = s.num_layers * layer + 2 * s.vocab_size * s.hidden_size
    assert 50e6 <= params <= 100e6
    assert s.head_dim in (32, 64, 128)


def test_resolve_model_builtin_folder_and_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    folder = resolve_model("tiny")
    assert folder.parent == tmp_path / "cache"
    assert resolve_model(str(folder)) == folder
    with pytest.raises(CheckpointError, match="neither a built-in"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown built-in"):
        builtin_checkpoint("huge", tmp_path)
