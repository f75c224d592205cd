"""Tensor parallelism inside a worker (CPU, gloo): the layout's arithmetic, exactness of
TP=2 and TP=4 against TP=1 and transformers (ranks as threads), the offline LLM's spawned
ranks reading a GGUF file, per-rank weight memory, clear refusals."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import pytest
import torch

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.engine.engine import Engine
from pdserve.engine.model.loader import load_model
from pdserve.engine.model.parallel import load_parallel_model
from pdserve.engine.ports import free_port
from pdserve.engine.tp_group import TPAddress, TPGroup
from pdserve.engine.tp_layout import TPLayout, check_tp
from pdserve.kvtransfer.heads import shard_range
from tests.checkpoints import hf_classes, make_hf_checkpoint

MAX_NEW = 8
PROMPT_LENGTHS = (1, 9, 33, 70)
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, logprobs=0)

# GQA (4 query heads over 2 KV heads) with biases on q, k, v and o; MQA with tied embeddings
# (the vocabulary-parallel LM head is the embedding's shard). Heads divide by 4: TP=4 runs
# with KV heads replicated (2 ranks per head for GQA, 4 for MQA).
CHECKPOINTS = {
    "llama-gqa-bias": ("llama", {"attention_bias": True}),
    "qwen2-mqa-tied": ("qwen2", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
}


def test_kv_heads_match_the_transfer_layer_sharding() -> None:
    for total in (1, 2, 4, 8):
        for world in (1, 2, 4, 8):
            if total % world and world % total:
                continue
            for rank in range(world):
                lay = TPLayout(rank, world, 8, total, 16, 64, 100)
                span, heads = lay.kv_heads(), shard_range(total, world, rank)
                assert (span.start, span.stop) == (heads.start, heads.stop)
                # every query head of the rank reads a KV head the rank holds
                group = 8 // total
                q = lay.heads()
                assert {h // group for h in range(q.start, q.stop)} <= set(
                    range(span.start, span.stop))


def test_vocabulary_is_padded_and_split_without_overlap() -> None:
    spans = [TPLayout(r, 4, 4, 2, 16, 64, 101).vocab() for r in range(4)]
    assert [(s.start, s.stop) for s in spans] == [(0, 26), (26, 52), (52, 78), (78, 101)]
    assert TPLayout(0, 4, 4, 2, 16, 64, 101).local_vocab == 26


def test_unsplittable_sizes_are_refused_with_the_sizes_that_fit() -> None:
    with pytest.raises(ValueError, match=r"3 .*4 attention heads.*that fit this model: 1, 2, 4"):
        check_tp(4, 2, 128, 3)
    with pytest.raises(ValueError, match="KV heads"):
        check_tp(12, 3, 120, 2)
    with pytest.raises(ValueError, match="tensor-parallel size 3"):
        LLM("tiny", device="cpu", tensor_parallel_size=3)  # refused before any rank starts


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """name -> (checkpoint, prompts, transformers' greedy tokens and logprobs)."""
    out = {}
    for i, (name, (arch, overrides)) in enumerate(CHECKPOINTS.items()):
        path = make_hf_checkpoint(arch, tmp_path_factory.mktemp(name), seed=11 + i,
                                  eos_token_id=None, **overrides)
        _, model_cls = hf_classes(arch)
        model = model_cls.from_pretrained(path, dtype=torch.float32).eval()
        rng = random.Random(i)
        prompts = [[rng.randrange(3, 128) for _ in range(n)] for n in PROMPT_LENGTHS]
        out[name] = (path, prompts, [hf_greedy(model, p) for p in prompts])
    return out


@torch.no_grad()
def hf_greedy(model: torch.nn.Module, prompt: list[int]) -> tuple[list[int], list[float]]:
    out = model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=MAX_NEW, do_sample=False, output_logits=True,
        return_dict_in_generate=True, pad_token_id=0,
    )
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item()
                for step, t in zip(out.logits, tokens, strict=True)]
    return tokens, logprobs


def _run(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> dict:
    """Every finished output (forked choices too), by request id."""
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    return done


def thread_ranks_generate(config: EngineConfig, world: int, prompts: list[list[int]],
                          params: SamplingParams, every: bool = False,
                          then: Callable[[Engine], None] | None = None,
                          engines: list[Engine] | None = None) -> list | dict:
    """Greedy outputs of an engine of ``world`` ranks whose ranks 1..N-1 are threads of this
    process (the same TPGroup over gloo, the same step-plan broadcast and collectives as rank
    processes: only the process boundary is left out, which the GGUF test below and the
    service tests cross). ``then(rank 0's engine)`` runs after the prompts, before the
    ranks stop; ``engines`` receives every rank's engine, rank 0 first (closed)."""
    address = TPAddress("127.0.0.1", free_port(), "threads", world, timeout_s=120)
    errors: list[BaseException] = []

    def follower(rank: int) -> None:
        try:
            engine = Engine(config, tp=TPGroup(address, rank, torch.device("cpu")))
            followers.append(engine)
            try:
                engine.follow()
            finally:
                engine.close()
        except BaseException as e:  # reported below
            errors.append(e)

    followers: list[Engine] = []
    threads = [threading.Thread(target=follower, args=(r,), daemon=True) for r in range(1, world)]
    for t in threads:
        t.start()
    engine = Engine(config, tp=TPGroup(address, 0, torch.device("cpu")))
    try:
        done = _run(engine, prompts, params)
        if then is not None:
            then(engine)
    finally:
        engine.close()
        for t in threads:
            t.join(60)
    assert not errors, errors
    if engines is not None:
        engines += [engine, *followers]
    return done if every else [done[f"r{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_tp_greedy_tokens_and_logprobs_equal_tp1_and_transformers(references, name) -> None:
    path, prompts, expected = references[name]
    # Small budgets: prompts are prefilled in chunks beside running decodes.
    config = EngineConfig(model=str(path), dtype="float32", device="cpu", detokenize=False,
                          cache=CacheConfig(block_size=8, num_blocks=64),
                          scheduler=SchedulerConfig(max_num_batched_tokens=40, max_num_seqs=8))
    got = {1: LLM(str(path), dtype="float32", device="cpu", block_size=8, num_blocks=64,
                  max_num_batched_tokens=40, max_num_seqs=8,
                  detokenize=False).generate(prompts, GREEDY)}
    for tp in (2, 4):
        got[tp] = thread_ranks_generate(config, tp, prompts, GREEDY)
    for tp, outs in got.items():
        for out, (tokens, logprobs), tp1 in zip(outs, expected, got[1], strict=True):
            assert out.token_ids == tokens == tp1.token_ids, f"TP={tp}"
            ours = [lp.logprob for lp in out.logprobs]
            assert max(abs(a - b) for a, b in zip(ours, logprobs, strict=True)) < 1e-3
            assert out.finish_reason == "length"


def test_tp2_prompt_logprobs_equal_tp1_and_forked_blocks_are_copied_on_every_rank(
        references) -> None:
    """Prompt logprobs (logits of prefill rows: a gather every rank joins) equal TP=1's; the
    block copy of an n > 1 fork runs on every rank (each copies its own heads)."""
    path, prompts, _ = references["llama-gqa-bias"]
    config = EngineConfig(model=str(path), dtype="float32", device="cpu", detokenize=False,
                          cache=CacheConfig(block_size=8, num_blocks=64),
                          scheduler=SchedulerConfig(max_num_batched_tokens=40, max_num_seqs=8))
    params = SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=1)
    one = _run(Engine(config), prompts[1:3], params)
    engines: list[Engine] = []
    two = thread_ranks_generate(config, 2, prompts[1:3], params, every=True,
                                then=lambda e: e.runner.copy_block(1, 60), engines=engines)
    assert sorted(one) == sorted(two) == ["r0", "r1"]
    for rid, out in one.items():
        assert two[rid].token_ids == out.token_ids, rid
        got = [lp.logprob for lp in two[rid].prompt_logprobs]
        want = [lp.logprob for lp in out.prompt_logprobs]
        assert len(got) == len(want) == len(out.prompt_token_ids) - 1
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4
    assert len(engines) == 2 and engines[0] is not engines[1]
    for e in engines:
        cache = e.runner.kv_cache
        assert cache[1].any() and torch.equal(cache[60], cache[1])


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_each_rank_loads_about_half_the_weights_with_tp2(references) -> None:
    path = references["llama-gqa-bias"][0]
    full = _param_bytes(load_model(path, "float32", "cpu"))
    address = TPAddress("127.0.0.1", free_port(), "mem", 2, timeout_s=120)
    sizes: dict[int, int] = {}
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            group = TPGroup(address, r, torch.device("cpu"))
            model = load_parallel_model(path, torch.float32, torch.device("cpu"), group)
            sizes[r] = _param_bytes(model)
            group.close()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    # Only the norms (and rank 0's o_proj bias) are replicated: under 1% of these weights.
    for r in range(2):
        assert 0.5 * full <= sizes[r] <= 0.51 * full, (r, sizes[r], full)


def test_gguf_ranks_read_their_shards_and_generate_like_tp1(references, tmp_path) -> None:
    from tests.gguf_files import write_gguf

    path, prompts, expected = references["qwen2-mqa-tied"]
    gguf = write_gguf(path, tmp_path / "m.gguf")
    llm = LLM(str(gguf), dtype="float32", device="cpu", tensor_parallel_size=2,
              num_blocks=64, detokenize=False)
    try:
        outs = llm.generate(prompts[:2], GREEDY)
    finally:
        llm.close()
    assert [o.token_ids for o in outs] == [tokens for tokens, _ in expected[:2]]


def test_pool_tp_degrees_below_one_are_refused_at_start() -> None:
    from pdserve.router.pool_config import check_tp_pair

    for a, b in ((1, 1), (2, 2), (1, 2), (2, 1), (4, 2), (2, 4)):
        for transport in ("nixl", "nccl"):
            check_tp_pair(a, b, transport)  # every pair of degrees, either transport
    with pytest.raises(ValueError, match="at least 1"):
        check_tp_pair(0, 1, "nccl")
    with pytest.raises(ValueError, match="at least 1"):
        check_tp_pair(2, 0, "nixl")


def test_a_pool_takes_one_degree_or_one_per_worker() -> None:
    from pdserve.cli import _degrees
    from pdserve.router.pool_config import PoolConfig

    assert _degrees("2") == 2 and _degrees("1,2") == (1, 2)
    pools = PoolConfig(engine=EngineConfig(model="tiny"), num_prefill=2, num_decode=1,
                       prefill_tp=(1, 2), decode_tp=2)
    assert [pools.tp("prefill", i) for i in range(2)] == [1, 2]
    assert pools.tp("decode", 0) == 2 and pools.total_ranks() == 5
    with pytest.raises(ValueError, match="--prefill-tp names 2 degrees for 3 workers"):
        PoolConfig(engine=EngineConfig(model="tiny"), num_prefill=3, num_decode=1,
                   prefill_tp=(1, 2))


def test_cores_are_planned_per_rank_and_divided_between_a_workers_ranks() -> None:
    from pdserve.router.pool_config import PoolConfig, plan_worker_cpus
    from pdserve.worker.affinity import split_cpus

    pools = PoolConfig(engine=EngineConfig(model="tiny"), num_prefill=1, num_decode=2,
                       decode_tp=(2, 1))
    sets = plan_worker_cpus(range(8), pools)
    # 4 ranks over 8 cores: two each; decode-0 (TP=2) holds two ranks' shares.
    assert sets == {"prefill-0": (0, 1), "decode-0": (2, 3, 4, 5), "decode-1": (6, 7)}
    assert split_cpus(sets["decode-0"], 2) == [(2, 3), (4, 5)]
    assert split_cpus((6,), 2) == [(6,), (6,)]  # fewer cores than ranks: shared
    assert plan_worker_cpus(range(3), pools) == {}  # fewer cores than ranks: not pinned
