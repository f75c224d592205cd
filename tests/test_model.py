"""CausalLM + loader against transformers on small random checkpoints of each architecture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdserve.engine.attention.base import AttentionMetadata
from pdserve.engine.attention.torch_backend import TorchAttentionBackend
from pdserve.engine.config import RopeConfig
from pdserve.engine.model.cpu_linear import PACKED, pack_model, packing_supported
from pdserve.engine.model.llama import rope_inv_freq
from pdserve.engine.model.loader import CheckpointError, load_model, load_model_config
from tests.checkpoints import (
    BLOCK_SIZE,
    NUM_BLOCKS,
    decode_meta,
    hf_classes,
    make_hf_checkpoint,
    new_cache,
    prefill_meta,
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-llama3-rope": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "llama-linear-rope": ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0}}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "qwen2-mqa": ("qwen2", {"num_key_value_heads": 1}),
    "llama-attention-bias": ("llama", {"attention_bias": True}),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return {
        name: make_hf_checkpoint(arch, root / name, seed=i, **overrides)
        for i, (name, (arch, overrides)) in enumerate(CASES.items())
    }


def hf_reference(folder: Path, arch: str) -> torch.nn.Module:
    _, model_cls = hf_classes(arch)
    return model_cls.from_pretrained(folder, dtype=torch.float32).eval()


def prompt(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_prefill_and_decode_logprobs_match_transformers(
    case: str, checkpoints: dict[str, Path]
) -> None:
    folder = checkpoints[case]
    model = load_model(folder, "float32", "cpu")
    ref = hf_reference(folder, CASES[case][0])
    n = 50
    ids = prompt(n + 1, model.config.vocab_size)
    expected = ref(ids[None]).logits[0].float().log_softmax(-1)
    backend, cache = TorchAttentionBackend(), new_cache(model)

    hidden = model(ids[:n], torch.arange(n), cache, prefill_meta(n), backend)
    assert hidden.shape == (n, model.config.hidden_size)
    logits = model.compute_logits(hidden)
    assert logits.dtype == torch.float32
    assert (logits.log_softmax(-1) - expected[:n]).abs().max() < 1e-3

    hidden = model(ids[n:], torch.tensor([n]), cache, decode_meta(n), backend)
    got = model.compute_logits(hidden).log_softmax(-1)
    assert (got - expected[n:]).abs().max() < 1e-3


@pytest.mark.parametrize("case", ["llama-llama3-rope", "qwen3", "qwen2-mqa"])
@torch.no_grad()
def test_greedy_tokens_equal_transformers_generate(case: str, checkpoints: dict[str, Path]) -> None:
    folder = checkpoints[case]
    model = load_model(folder, "float32", "cpu")
    ref = hf_reference(folder, CASES[case][0])
    n, steps = 20, 12
    ids = prompt(n, model.config.vocab_size, seed=3)
    expected = ref.generate(
        ids[None],
        attention_mask=torch.ones(1, n, dtype=torch.long),
        max_new_tokens=steps,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )[0, n:].tolist()

    backend, cache = TorchAttentionBackend(), new_cache(model)
    hidden = model(ids, torch.arange(n), cache, prefill_meta(n), backend)
    tokens = [int(model.compute_logits(hidden[-1:]).argmax())]
    for pos in range(n, n + steps - 1):
        hidden = model(
            torch.tensor(tokens[-1:]), torch.tensor([pos]), cache, decode_meta(pos), backend
        )
        tokens.append(int(model.compute_logits(hidden).argmax()))
    assert tokens == expected


@torch.no_grad()
def test_mixed_batch_of_decode_and_prefill_chunk_matches_separate_runs(
    checkpoints: dict[str, Path],
) -> None:
    model = load_model(checkpoints["qwen3"], "float32", "cpu")
    backend = TorchAttentionBackend()
    a, b = prompt(21, model.config.vocab_size, 1), prompt(30, model.config.vocab_size, 2)
    # Reference: each sequence alone (A: 20-token prefill + 1 decode; B: one 30-token prefill).
    cache = new_cache(model)
    model(a[:20], torch.arange(20), cache, prefill_meta(20), backend)
    ref_a = model(a[20:], torch.tensor([20]), cache, decode_meta(20), backend)
    ref_b = model(b, torch.arange(30), new_cache(model), prefill_meta(30), backend)

    # Batched: A's decode first, then B's second chunk (tokens 10..29) over its cached 10.
    cache = new_cache(model, 2 * NUM_BLOCKS)
    model(a[:20], torch.arange(20), cache, prefill_meta(20), backend)  # A in blocks 0..7
    b_table = torch.arange(NUM_BLOCKS, 2 * NUM_BLOCKS, dtype=torch.int32)
    pos_b = torch.arange(10)
    first = AttentionMetadata(
        slot_block_ids=b_table[pos_b // BLOCK_SIZE].long(),
        slot_offsets=pos_b % BLOCK_SIZE,
        num_decodes=0,
        decode_block_tables=torch.zeros(0, NUM_BLOCKS, dtype=torch.int32),
        decode_seq_lens=torch.zeros(0, dtype=torch.int32),
        prefill_query_start_loc=torch.tensor([0, 10], dtype=torch.int32),
        prefill_seq_lens=torch.tensor([10], dtype=torch.int32),
        prefill_block_tables=b_table[None],
        prefill_query_lens_cpu=[10],
        prefill_seq_lens_cpu=[10],
    )
    model(b[:10], pos_b, cache, first, backend)
    pos = torch.cat([torch.tensor([20]), torch.arange(10, 30)])
    a_table = torch.arange(NUM_BLOCKS, dtype=torch.int32)
    mixed = AttentionMetadata(
        slot_block_ids=torch.cat(
            [a_table[pos[:1] // BLOCK_SIZE], b_table[pos[1:] // BLOCK_SIZE]]
        ).long(),
        slot_offsets=pos % BLOCK_SIZE,
        num_decodes=1,
        decode_block_tables=a_table[None],
        decode_seq_lens=torch.tensor([21], dtype=torch.int32),
        prefill_query_start_loc=torch.tensor([0, 20], dtype=torch.int32),
        prefill_seq_lens=torch.tensor([30], dtype=torch.int32),
        prefill_block_tables=b_table[None],
        prefill_query_lens_cpu=[20],
        prefill_seq_lens_cpu=[30],
        max_decode_seq_len=21,
    )
    out = model(torch.cat([a[20:], b[10:]]), pos, cache, mixed, backend)
    torch.testing.assert_close(out[:1], ref_a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1:], ref_b[10:], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_bf16_loads_and_runs(checkpoints: dict[str, Path]) -> None:
    folder = checkpoints["llama-llama3-rope"]
    model = load_model(folder, "bf16", "cpu")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.rope_cache.dtype == torch.bfloat16
    n = 40
    ids = prompt(n, model.config.vocab_size)
    hidden = model(ids, torch.arange(n), new_cache(model), prefill_meta(n), TorchAttentionBackend())
    assert hidden.dtype == torch.bfloat16
    logits = model.compute_logits(hidden)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    ref = hf_reference(folder, "llama")(ids[None]).logits[0]
    agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree > 0.8


PACKING_CASES = pytest.mark.parametrize(
    "case", ["llama-llama3-rope", "llama-tied", "llama-attention-bias"])


def logits_before_and_after_packing(
    model: torch.nn.Module,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """A 40-token prompt, and (prefill logits, logits of 3 decode-sized rows) with the plain
    weights and then with the weights packed by ``pack_model``."""
    n = 40
    ids = prompt(n, model.config.vocab_size)
    backend = TorchAttentionBackend()
    rows = torch.randn(3, model.config.hidden_size, dtype=model.dtype)

    def logits() -> tuple[torch.Tensor, torch.Tensor]:
        hidden = model(ids, torch.arange(n), new_cache(model), prefill_meta(n), backend)
        return model.compute_logits(hidden), model.compute_logits(rows)

    plain = logits()
    assert pack_model(model)
    return ids, plain, logits()


@pytest.mark.skipif(not packing_supported(torch.bfloat16, torch.device("cpu")),
                    reason="this CPU has no native oneDNN bfloat16 kernels")
@PACKING_CASES
@torch.no_grad()
def test_bf16_packed_weights_give_the_same_logits(checkpoints: dict[str, Path], case: str) -> None:
    """Weights packed once for oneDNN: the same bits as the plain weights' ``F.linear``, at a
    prefill and a decode-sized row count, tied and untied output projections alike."""
    model = load_model(checkpoints[case], "bf16", "cpu")
    _, (plain, plain_rows), (packed, packed_rows) = logits_before_and_after_packing(model)
    assert all(getattr(layer, name).is_mkldnn for layer in model.layers for name in PACKED)
    assert model.head_weight().is_mkldnn and not model.embed_tokens.is_mkldnn
    assert torch.equal(packed, plain)
    assert torch.equal(packed_rows, plain_rows)


@pytest.mark.skipif(not packing_supported(torch.float32, torch.device("cpu")),
                    reason="no float32 linear kernel here (CPU kernels not built, or no AVX-512)")
@PACKING_CASES
@torch.no_grad()
def test_fp32_packed_weights_give_the_references_logits(checkpoints: dict[str, Path],
                                                        case: str) -> None:
    """float32 weights packed for the engine's kernel: logits within float32 rounding of the
    plain weights' and transformers', at a prefill and a decode-sized row count, tied and
    untied output projections alike (the embedding stays plain for the lookup)."""
    from pdserve.engine.model.cpu_linear import PackedF32

    model = load_model(checkpoints[case], "float32", "cpu")
    ids, (plain, plain_rows), (packed, packed_rows) = logits_before_and_after_packing(model)
    assert all(isinstance(getattr(layer, name), PackedF32)
               for layer in model.layers for name in PACKED)
    assert isinstance(model.head_weight(), PackedF32)
    assert not isinstance(model.embed_tokens, PackedF32)
    torch.testing.assert_close(packed, plain, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(packed_rows, plain_rows, rtol=1e-5, atol=1e-5)
    ref = hf_reference(checkpoints[case], CASES[case][0])(ids[None]).logits[0]
    torch.testing.assert_close(packed, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(packed.argmax(-1), ref.argmax(-1))


def test_sharded_checkpoint_loads_like_single_file(
    tmp_path: Path, checkpoints: dict[str, Path]
) -> None:
    sharded = make_hf_checkpoint("qwen2", tmp_path / "sharded", seed=3, max_shard_size="60KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    single = load_model(checkpoints["qwen2"], "float32", "cpu")
    model = load_model(sharded, "float32", "cpu")
    for (name, p), q in zip(model.named_parameters(), single.parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize(
    ("rope", "head_dim"),
    [
        ({"rope_type": "default", "rope_theta": 10000.0}, 64),
        ({"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, 32),
        (LLAMA3_ROPE, 128),
    ],
)
def test_rope_inv_freq_equals_transformers(rope: dict[str, Any], head_dim: int) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf = LlamaConfig(
        hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim, rope_parameters=rope
    )
    init = ROPE_INIT_FUNCTIONS.get(rope["rope_type"])
    expected, _ = (init or LlamaRotaryEmbedding.compute_default_rope_parameters)(hf)
    ours = rope_inv_freq(RopeConfig.from_hf({"rope_parameters": rope}), head_dim)
    assert torch.equal(ours, expected)


def test_generation_config_eos_ids_take_precedence(tmp_path: Path) -> None:
    folder = make_hf_checkpoint("llama", tmp_path / "m")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    assert load_model_config(folder).eos_token_ids == (2, 5)


# -- broken checkpoints -------------------------------------------------------------------


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return make_hf_checkpoint("llama", tmp_path / "good")


def _edit_tensors(folder: Path, edit: Any) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_missing_folder_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope", "float32", "cpu")


def test_missing_config_json_is_named(good: Path) -> None:
    (good / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(good, "float32", "cpu")


def test_unknown_architecture_is_named(good: Path) -> None:
    cfg = json.loads((good / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (good / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported architecture.*GPT2LMHeadModel"):
        load_model(good, "float32", "cpu")


def test_missing_weights_are_named(good: Path) -> None:
    (good / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_model(good, "float32", "cpu")


def test_missing_tensor_is_named(good: Path) -> None:
    _edit_tensors(good, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(good, "float32", "cpu")


def test_wrong_shape_is_named_with_both_shapes(good: Path) -> None:
    def shrink(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:100]

    _edit_tensors(good, shrink)
    with pytest.raises(CheckpointError, match=r"up_proj\.weight.*\[100, 64\].*\[128, 64\]"):
        load_model(good, "float32", "cpu")


def test_unexpected_tensor_is_named_but_inv_freq_is_ignored(good: Path) -> None:
    def add(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    _edit_tensors(good, add)
    load_model(good, "float32", "cpu")
    _edit_tensors(good, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.ones(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected.*mlp\.extra\.weight"):
        load_model(good, "float32", "cpu")


def test_index_pointing_to_missing_shard_is_named(tmp_path: Path) -> None:
    folder = make_hf_checkpoint("llama", tmp_path / "s", max_shard_size="60KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (folder / shard).unlink()
    with pytest.raises(CheckpointError, match=f"shard '{shard}'.*does not exist"):
        load_model(folder, "float32", "cpu")


def test_unsupported_dtype_is_a_checkpoint_error(good: Path) -> None:
    with pytest.raises(CheckpointError, match="unsupported dtype"):
        load_model(good, "int8", "cpu")


def test_corrupt_safetensors_is_a_checkpoint_error(good: Path) -> None:
    data = (good / "model.safetensors").read_bytes()
    (good / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="cannot read the weights"):
        load_model(good, "float32", "cpu")


def test_tied_checkpoint_may_still_carry_lm_head(tmp_path: Path) -> None:
    folder = make_hf_checkpoint("llama", tmp_path / "t", tie_word_embeddings=True)
    _edit_tensors(
        folder, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()})
    )
    model = load_model(folder, "float32", "cpu")
    assert model.lm_head is None
