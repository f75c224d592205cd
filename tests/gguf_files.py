"""Small GGUF files for tests, written with the ``gguf`` package the way llama.cpp's
converter writes them: GGUF tensor names and metadata keys, q/k rows interleaved for the
llama and mistral architectures, weights stored as F32, F16, or quantized by
``gguf.quants.quantize`` (Q8_0, Q4_0, ...), and the byte-level BPE tokenizer of a
Hugging Face folder (vocabulary, merges, token types, special ids, chat template).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors.torch import load_file

_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
           "output_norm.weight", "lm_head.weight": "output.weight"}


def gguf_name(hf: str) -> str:
    if hf in _GLOBAL:
        return _GLOBAL[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{_LAYER[rest]}"


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: each head's two rotary halves interleaved."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _tokenizer(writer: gguf.GGUFWriter, folder: Path, chat_template: bool) -> None:
    tok = json.loads((folder / "tokenizer.json").read_text())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    special = {t["content"] for t in tok.get("added_tokens", []) if t.get("special")}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_bos_token_id(vocab[config["bos_token"]])
    writer.add_eos_token_id(vocab[config["eos_token"]])
    writer.add_pad_token_id(vocab[config["pad_token"]])
    writer.add_add_bos_token(bool(config.get("add_bos_token", False)))
    if chat_template and config.get("chat_template"):
        writer.add_chat_template(config["chat_template"])


def write_gguf(folder: str | Path, out: str | Path, *, qtype: Any = gguf.GGMLQuantizationType.F32,
               tokenizer: bool = False, chat_template: bool = True,
               extra: dict[str, Any] | None = None) -> Path:
    """Convert the Hugging Face checkpoint ``folder`` to the GGUF file ``out``. 2-D weights
    (but the norms) are stored as ``qtype``; ``tokenizer`` adds the folder's tokenizer."""
    folder, out = Path(folder), Path(out)
    config = json.loads((folder / "config.json").read_text())
    arch = config["model_type"]
    writer = gguf.GGUFWriter(str(out), arch)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_rope_dimension_count(config["head_dim"])
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    for key, value in (extra or {}).items():
        if isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, int(value))
    if tokenizer:
        _tokenizer(writer, folder, chat_template)
    else:
        writer.add_bos_token_id(int(config.get("bos_token_id") or 0))
        writer.add_eos_token_id(int(config.get("eos_token_id") or 0))
    tensors = load_file(str(folder / "model.safetensors")) if (folder / "model.safetensors"
                                                                ).is_file() else {}
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    for name in sorted(tensors):
        w = tensors[name].float().numpy()
        if arch in ("llama", "mistral") and (".q_proj." in name or ".k_proj." in name):
            w = permute(w, heads if ".q_proj." in name else kv_heads)
        if w.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.quantize(w, qtype)
            writer.add_tensor(gguf_name(name), data, raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(name), w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
