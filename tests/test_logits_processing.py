"""Penalties, logit_bias, min_tokens, bad words and allowed tokens: the engine's greedy
tokens equal transformers' ``generate`` with the matching logits processors, on a test
checkpoint (every case in ONE engine batch, so rows with and without processing share
steps). Presence and frequency penalties have no transformers processor: ``VllmPenalties``
below writes them as vLLM defines them (output tokens only).
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.engine.engine import Engine
from pdserve.engine.sampling import SamplingParams
from tests.checkpoints import hf_classes, make_hf_checkpoint

EOS = 2
MAX_NEW = 14


class VllmPenalties(LogitsProcessor):
    """vLLM's presence and frequency penalties: each output token's count times
    ``frequency``, plus ``presence`` once per token present, off its logit."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor):
        out = input_ids[0, self.prompt_len:]
        counts = torch.bincount(out, minlength=scores.shape[-1]).to(scores.dtype)
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class AllowedTokens(LogitsProcessor):
    def __init__(self, allowed: list[int]) -> None:
        self.allowed = allowed

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor):
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[:, self.allowed] = True
        return scores.masked_fill(~keep, float("-inf"))


def _cases(prompt: list[int], greedy_tokens: list[int]) -> dict[str, dict]:
    """name -> SamplingParams fields. Bad words are taken from the unprocessed greedy
    output, so that banning them must change it."""
    first, second = greedy_tokens[0], greedy_tokens[1]
    return {
        "repetition": {"repetition_penalty": 1.8},
        "repetition_below_1": {"repetition_penalty": 0.6},
        "presence": {"presence_penalty": -2.0},
        "frequency": {"frequency_penalty": -1.5},
        "logit_bias": {"logit_bias": ((first, -50.0), (7, 9.0), (11, 4.5))},
        # EOS made the favourite; min_tokens holds it off for 6 tokens.
        "min_tokens": {"min_tokens": 6, "logit_bias": ((EOS, 30.0),)},
        "bad_words": {"bad_words_ids": ((first,), (second, greedy_tokens[2]),
                                        (prompt[-1], second))},
        "allowed": {"allowed_token_ids": (5, 9, 17, 33, 64, EOS)},
        "all": {"allowed_token_ids": tuple(range(3, 100)), "bad_words_ids": ((first,),),
                "min_tokens": 4, "logit_bias": ((12, 2.0),), "repetition_penalty": 1.3,
                "presence_penalty": 1.4, "frequency_penalty": 0.9},
    }


def _hf_processors(fields: dict, prompt_len: int) -> LogitsProcessorList:
    """transformers' processors in the engine's order: allowed, bad words, min_tokens,
    logit_bias, repetition, presence / frequency."""
    procs: list[LogitsProcessor] = []
    if "allowed_token_ids" in fields:
        procs.append(AllowedTokens(list(fields["allowed_token_ids"])))
    if "bad_words_ids" in fields:
        procs.append(NoBadWordsLogitsProcessor([list(w) for w in fields["bad_words_ids"]],
                                               eos_token_id=None))
    if "min_tokens" in fields:
        procs.append(MinNewTokensLengthLogitsProcessor(prompt_len, fields["min_tokens"], EOS))
    if "logit_bias" in fields:
        procs.append(SequenceBiasLogitsProcessor({(t,): b for t, b in fields["logit_bias"]}))
    if "repetition_penalty" in fields:
        procs.append(RepetitionPenaltyLogitsProcessor(fields["repetition_penalty"]))
    if "presence_penalty" in fields or "frequency_penalty" in fields:
        procs.append(VllmPenalties(prompt_len, fields.get("presence_penalty", 0.0),
                                   fields.get("frequency_penalty", 0.0)))
    return LogitsProcessorList(procs)


@torch.no_grad()
def _hf_greedy(model, prompt: list[int], procs: LogitsProcessorList) -> list[int]:
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                         dtype=torch.long), max_new_tokens=MAX_NEW, do_sample=False,
                         logits_processor=procs, eos_token_id=EOS, pad_token_id=0)
    tokens = out[0, len(prompt):].tolist()
    if EOS in tokens:
        tokens = tokens[: tokens.index(EOS) + 1]
    return tokens


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    path = make_hf_checkpoint("llama", tmp_path_factory.mktemp("lp"), seed=11)
    _, model_cls = hf_classes("llama")
    model = model_cls.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = EOS
    return path, model


def test_processed_greedy_tokens_equal_transformers(checkpoint) -> None:
    path, model = checkpoint
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 128) for _ in range(n)] for n in (5, 21)]
    # A prompt that repeats itself, so that repetition penalties bite from the first token.
    prompts.append([40, 41, 42, 40, 41, 42, 40, 41])
    engine = Engine(EngineConfig(
        model=str(path), dtype="float32", device="cpu", detokenize=False,
        cache=CacheConfig(block_size=8, num_blocks=128),
        scheduler=SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=64)))
    expected: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        plain = _hf_greedy(model, prompt, LogitsProcessorList())
        engine.add_request(f"plain{i}", prompt, SamplingParams(max_tokens=MAX_NEW,
                                                               temperature=0.0))
        expected[f"plain{i}"] = plain
        for name, fields in _cases(prompt, plain).items():
            rid = f"{name}{i}"
            expected[rid] = _hf_greedy(model, prompt, _hf_processors(fields, len(prompt)))
            engine.add_request(rid, prompt, SamplingParams(max_tokens=MAX_NEW,
                                                           temperature=0.0, **fields))
    got: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            if out.finished:
                got[out.request_id] = out.token_ids
    assert got == expected
    for i in range(len(prompts)):  # every case changed the output (none was a no-op)
        for name in _cases(prompts[i], expected[f"plain{i}"]):
            if name != "min_tokens":
                assert expected[f"{name}{i}"] != expected[f"plain{i}"], (name, i)
        assert len(expected[f"min_tokens{i}"]) == 7 and expected[f"min_tokens{i}"][-1] == EOS
