"""Tokenizer wrapper and incremental detokenization on the built-in byte-level tokenizer."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from pdserve.engine.model.builtin import builtin_checkpoint
from pdserve.engine.model.loader import CheckpointError
from pdserve.engine.tokenizer import IncrementalDetokenizer, NoChatTemplateError, Tokenizer

TEXTS = [
    "Hello, world!",
    "Grüße aus München — déjà vu 😀🚀👍🏽 🇫🇷 👨‍👩‍👧",
    "中文：你好，世界。日本語：こんにちは 한국어 العربية עברית",
    "tabs\tand\nnew lines\r\n  double  spaces ",
    "",
    "\x00\x07 zero-width\u200bjoiner \ufeff bom 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer(builtin_checkpoint("tiny", tmp_path_factory.mktemp("builtin")))


def random_text(rng: random.Random, n: int) -> str:
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x4FF), (0x4E00, 0x4FFF), (0x1F300, 0x1FAFF)]
    chars = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        chars.append(chr(rng.randint(lo, hi)))
    return "".join(chars)


def test_encode_adds_bos_and_round_trips_any_text(tok: Tokenizer) -> None:
    rng = random.Random(0)
    for text in TEXTS + [random_text(rng, 60) for _ in range(50)]:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids) == text
    assert tok.eos_token_id == 1
    assert tok.vocab_size == 512


def test_incremental_deltas_equal_full_decode_for_random_token_streams(tok: Tokenizer) -> None:
    rng = random.Random(1)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 40))]
        detok = IncrementalDetokenizer(tok)
        text, i = "", 0
        while i < len(ids):
            k = rng.randint(0, 3)
            text += detok.push(ids[i : i + k])
            i += k
        assert text + detok.flush() == tok.decode(ids)


def test_emoji_split_over_tokens_is_emitted_once_complete(tok: Tokenizer) -> None:
    text = "ok 😀 déjà 👨‍👩‍👧!"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push([i]) for i in ids]
    assert len(ids) > len(text.encode("utf-8")) / 2  # multi-byte chars span several tokens
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == text
    assert "😀" in deltas[[i for i, d in enumerate(deltas) if "😀" in d][0]]


def test_prompt_context_is_not_emitted(tok: Tokenizer) -> None:
    prompt = tok.encode("The prompt ")
    out = tok.encode(
        "continues 😀",
    )[1:]
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    assert "".join(detok.push([i]) for i in out) + detok.flush() == "continues 😀"


def test_special_tokens_are_skipped_in_deltas(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok)
    ids = tok.encode("hi") + [tok.eos_token_id]
    assert "".join(detok.push([i]) for i in ids) + detok.flush() == "hi"


def test_chat_template_and_no_generic_fallback(tok: Tokenizer, tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "Hi there"}]
    ids = tok.apply_chat_template(messages)
    assert ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<|bos|><|user|>\nHi there<|eos|>\n<|assistant|>\n"
    )

    bare = tmp_path / "bare"
    shutil.copytree(tok.path, bare)
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    bare_tok = Tokenizer(bare)
    assert not bare_tok.has_chat_template
    with pytest.raises(NoChatTemplateError, match="no chat template"):
        bare_tok.apply_chat_template(messages)
    given = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert bare_tok.decode(bare_tok.apply_chat_template(messages, chat_template=given)) == (
        "user: Hi there\n")


def test_missing_tokenizer_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        Tokenizer(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="tokenizer"):
        Tokenizer(tmp_path / "empty")
