"""GGUF checkpoints: dequantization against the gguf package's reference, the header parser
against ``gguf.GGUFReader``, weights and config against the Hugging Face checkpoint they were
converted from (every architecture), the tokenizer against transformers' GGUF tokenizer, and
clear errors for what is not supported. Files are written by the ``gguf`` package from small
random models (tests/gguf_files.py)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.attention.torch_backend import TorchAttentionBackend
from pdserve.engine.config import RopeConfig
from pdserve.engine.model.builtin import builtin_checkpoint, resolve_model
from pdserve.engine.model.checkpoint import CheckpointError, load_model_config
from pdserve.engine.model.gguf import is_gguf, read_gguf
from pdserve.engine.model.gguf_quants import dequantize
from pdserve.engine.model.llama import rope_inv_freq
from pdserve.engine.model.loader import load_model
from pdserve.engine.tokenizer import NoChatTemplateError, Tokenizer
from tests.checkpoints import make_hf_checkpoint, new_cache, prefill_meta
from tests.gguf_files import write_gguf

# The float scale fields of each block type (byte offsets), set to sane float16 values so
# that random blocks decode to finite numbers.
HALF_FIELDS = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
               T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def random_blocks(qtype: T, rows: int, blocks_per_row: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    _, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * blocks_per_row, block_bytes), dtype=np.uint8)
    for offset in HALF_FIELDS[qtype]:
        scales = rng.normal(0, 0.05, size=len(raw)).astype(np.float16)
        raw[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K,
                                   T.Q6_K], ids=lambda t: t.name)
def test_block_types_dequantize_exactly_as_the_gguf_reference(qtype: T) -> None:
    per_block, _ = GGML_QUANT_SIZES[qtype]
    rows, blocks = 5, 3
    raw = random_blocks(qtype, rows, blocks, seed=int(qtype))
    expected = gguf.quants.dequantize(raw, qtype)
    got = dequantize(torch.from_numpy(raw.copy()).reshape(-1), int(qtype),
                     (rows, blocks * per_block), torch.float32)
    assert got.shape == expected.shape == (rows, blocks * per_block)
    assert np.isfinite(expected).all()
    assert torch.equal(got, torch.from_numpy(expected))


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_float_types_dequantize_exactly_as_the_gguf_reference(qtype: T) -> None:
    values = np.random.default_rng(1).normal(size=(4, 96)).astype(np.float32)
    stored = np.ascontiguousarray(gguf.quants.quantize(values, qtype))
    expected = gguf.quants.dequantize(stored, qtype)
    raw = torch.from_numpy(stored.view(np.uint8).copy()).reshape(-1)
    got = dequantize(raw, int(qtype), (4, 96), torch.float32)
    assert torch.equal(got, torch.from_numpy(expected))
    assert dequantize(raw, int(qtype), (4, 96), torch.bfloat16).dtype == torch.bfloat16


def test_a_type_nobody_dequantizes_is_named_in_the_error() -> None:
    _, block_bytes = GGML_QUANT_SIZES[T.Q8_K]
    with pytest.raises(CheckpointError, match="quantization type Q8_K is not supported"):
        dequantize(torch.zeros(block_bytes, dtype=torch.uint8), int(T.Q8_K), (256,),
                   torch.float32)


# ------------------------------------------------------------------------------ files


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    tiny = builtin_checkpoint("tiny")
    out = {"tiny-folder": tiny,
           "tiny": write_gguf(tiny, root / "tiny.gguf", tokenizer=True),
           "tiny-q8": write_gguf(tiny, root / "tiny-q8.gguf", qtype=T.Q8_0, tokenizer=True),
           "tiny-no-template": write_gguf(tiny, root / "bare.gguf", tokenizer=True,
                                          chat_template=False)}
    for i, (name, arch, extra) in enumerate([
        ("llama", "llama", {}), ("mistral", "mistral", {}), ("qwen2", "qwen2", {}),
        ("qwen3", "qwen3", {}), ("llama-tied", "llama", {"tie_word_embeddings": True}),
    ]):
        folder = make_hf_checkpoint(arch, root / name, seed=i, **extra)
        out[f"{name}-folder"] = folder
        out[name] = write_gguf(folder, root / f"{name}.gguf")
    return out


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    n = len(ids)
    hidden = model(ids, torch.arange(n), new_cache(model), prefill_meta(n),
                   TorchAttentionBackend())
    return model.compute_logits(hidden)


def test_header_parser_agrees_with_gguf_reader(files: dict[str, Path]) -> None:
    ours = read_gguf(files["tiny-q8"])
    ref = gguf.GGUFReader(files["tiny-q8"])
    assert ours.architecture == "llama" and ours.version == 3
    for key, field in ref.fields.items():
        if not key.startswith("GGUF."):
            assert ours.metadata[key] == field.contents(), key
    assert set(ours.tensors) == {t.name for t in ref.tensors}
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert (info.offset, info.nbytes, info.ggml_type) == (t.data_offset, t.n_bytes,
                                                              int(t.tensor_type))
        assert info.shape == tuple(int(d) for d in reversed(t.shape))


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3", "llama-tied", "tiny"])
@torch.no_grad()
def test_gguf_loads_the_same_model_as_its_hf_checkpoint(files: dict[str, Path],
                                                        name: str) -> None:
    folder, path = files[f"{name}-folder"], files[name]
    assert is_gguf(path) and not is_gguf(folder)
    hf_config, config = load_model_config(folder), load_model_config(path)
    assert config.architecture == hf_config.architecture
    assert config.tie_word_embeddings == hf_config.tie_word_embeddings
    assert (config.qkv_bias, config.qk_norm) == (hf_config.qkv_bias, hf_config.qk_norm)
    assert config.num_kv_heads == hf_config.num_kv_heads
    reference, model = load_model(folder, "float32", "cpu"), load_model(path, "float32", "cpu")
    ids = torch.randint(0, config.vocab_size, (24,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(model, ids), logits(reference, ids))


@torch.no_grad()
def test_transformers_own_gguf_loader_reads_the_same_llama(files: dict[str, Path]) -> None:
    """An independent reading of the conventions (names, q/k row order, config keys)."""
    from transformers import AutoModelForCausalLM

    path = files["tiny-q8"]
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                               dtype=torch.float32).eval()
    model = load_model(path, "float32", "cpu")
    ids = torch.randint(0, 512, (30,), generator=torch.Generator().manual_seed(1))
    expected = ref(ids[None]).logits[0].log_softmax(-1)
    assert (logits(model, ids).log_softmax(-1) - expected).abs().max() < 1e-4


@torch.no_grad()
def test_quantized_weights_are_the_reference_dequantization(files: dict[str, Path]) -> None:
    """Q8_0 weights land as gguf's dequantizer decodes them, q/k rows back in HF order."""
    model = load_model(files["tiny-q8"], "float32", "cpu")
    reader = gguf.GGUFReader(files["tiny-q8"])
    raw = {t.name: t for t in reader.tensors}
    c = model.config
    q_rows = c.num_heads * c.head_dim
    down = gguf.quants.dequantize(raw["blk.1.ffn_down.weight"].data, T.Q8_0)
    assert torch.equal(model.layers[1].down_proj, torch.from_numpy(down))
    q = gguf.quants.dequantize(raw["blk.0.attn_q.weight"].data, T.Q8_0)
    # transformers' own inverse of llama.cpp's permutation, applied independently here
    q = q.reshape(c.num_heads, c.head_dim // 2, 2, -1).swapaxes(2, 1).reshape(q.shape)
    assert torch.equal(model.layers[0].qkv_proj[:q_rows], torch.from_numpy(q))
    embed = gguf.quants.dequantize(raw["token_embd.weight"].data, T.Q8_0)
    assert torch.equal(model.embed_tokens, torch.from_numpy(embed))


@torch.no_grad()
def test_rope_freqs_tensor_divides_the_rotary_frequencies(tmp_path: Path) -> None:
    """A Llama 3.1-style file (default rope + rope_freqs) runs as the llama3 rope type."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    folder = make_hf_checkpoint("llama", tmp_path / "llama3", rope_parameters=rope)
    path = write_gguf(folder, tmp_path / "llama3.gguf")
    head_dim = load_model_config(folder).head_dim
    default = rope_inv_freq(RopeConfig(theta=500000.0), head_dim)
    scaled = rope_inv_freq(RopeConfig.from_hf({"rope_parameters": rope}), head_dim)
    _append_tensor(path, "rope_freqs.weight", (default / scaled).numpy().astype(np.float32))
    reference, model = load_model(folder, "float32", "cpu"), load_model(path, "float32", "cpu")
    ids = torch.randint(0, 128, (60,), generator=torch.Generator().manual_seed(2))
    assert (logits(model, ids) - logits(reference, ids)).abs().max() < 1e-4


def _append_tensor(path: Path, name: str, value: np.ndarray) -> None:
    """Rewrite ``path`` with one more F32 tensor."""
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(str(path) + ".new", reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value_type = field.types[0]
        if value_type == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, field.contents())
        else:
            writer.add_key_value(key, field.contents(), value_type)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    Path(str(path) + ".new").replace(path)


def test_tokenizer_from_gguf_metadata_matches_transformers(files: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    path = files["tiny"]
    ours = Tokenizer(path)
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    folder = Tokenizer(files["tiny-folder"])
    texts = ["The quick brown fox", "Français: déjà vu 😀", "def main():\n\treturn 42",
             "<|eos|> special"]
    for text in texts:
        assert ours.encode(text) == ref.encode(text) == folder.encode(text), text
        ids = ours.encode(text)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert (ours.bos_token_id, ours.eos_token_id) == (folder.bos_token_id, folder.eos_token_id)
    messages = [{"role": "user", "content": "Hi there"}]
    assert ours.apply_chat_template(messages) == folder.apply_chat_template(messages)


def test_a_gguf_without_chat_template_refuses_chat_clearly(files: dict[str, Path]) -> None:
    tok = Tokenizer(files["tiny-no-template"])
    assert not tok.has_chat_template
    with pytest.raises(NoChatTemplateError, match="has no chat template.*--chat-template"):
        tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], chat_template=template)
    assert tok.decode(ids) == "[user] Hi\n"


def test_the_offline_engine_serves_a_gguf_file_like_its_folder(files: dict[str, Path]) -> None:
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompt = "The quick brown fox"
    from_gguf = LLM(model=str(files["tiny"]), dtype="float32", device="cpu", num_blocks=64)
    from_folder = LLM(model=str(files["tiny-folder"]), dtype="float32", device="cpu",
                      num_blocks=64)
    a, b = from_gguf.generate(prompt, params)[0], from_folder.generate(prompt, params)[0]
    assert a.token_ids == b.token_ids and a.text == b.text and len(a.token_ids) == 12


def test_unsupported_architecture_and_bad_files_are_named(files: dict[str, Path],
                                                         tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="GGUF architecture 'gpt2' is not supported"):
        load_model_config(tmp_path / "gpt2.gguf")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(files["tiny"].read_bytes()[:4096])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(truncated, "float32", "cpu")
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError, match="is not a GGUF file"):
        resolve_model(str(not_gguf))
    with pytest.raises(CheckpointError, match="neither a built-in .*smollm2"):
        resolve_model(str(tmp_path / "missing.gguf"))
