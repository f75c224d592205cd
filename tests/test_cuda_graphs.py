"""Decode through padded persistent buffers (the CUDA-graph path) against plain eager decode.

On CPU the graph runner replays eagerly on its buffers (``capture=False``): same inputs,
same padding rows, same padding block, no graphs. The CUDA tests (marked ``gpu``) capture
real graphs and compare them, and the Triton backend, against eager torch decode.
"""

from __future__ import annotations

import os

if "TRITON_INTERPRET" not in os.environ:  # conftest.py normally did this already
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import random
from pathlib import Path

import pytest
import torch

from pdserve.engine.attention import get_attention_backend
from pdserve.engine.config import KVCacheSpec
from pdserve.engine.cuda_graphs import (
    DecodeGraphRunner,
    ladder_sizes,
    pad_decode_batch,
    padded_batch_size,
)
from pdserve.engine.model.builtin import builtin_checkpoint
from pdserve.engine.model.llama import CausalLM
from pdserve.engine.model.loader import load_model
from pdserve.engine.runner import ModelRunner
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.scheduler import ScheduledBatch
from pdserve.engine.sequence import Sequence

HAS_CUDA = torch.cuda.is_available()
BLOCK = 4
NUM_BLOCKS = 48
STEPS = 4
PROMPT_LENS = (5, 8, 3, 11, 6)


def _interpreted() -> bool:
    try:
        from pdserve.engine.attention.triton_backend import INTERPRETED
    except ImportError:
        return False
    return INTERPRETED


BACKENDS = [
    "torch",
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(not _interpreted(), reason="needs triton's CPU interpreter"),
    ),
]
gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA or _interpreted(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def tiny() -> Path:
    return builtin_checkpoint("tiny")


def make_seqs(n: int, vocab: int, seed: int = 0) -> list[Sequence]:
    """``n`` sequences of ``PROMPT_LENS`` prompts, each owning enough blocks for its prompt
    and ``STEPS`` more tokens; blocks handed out shuffled, block 0 left unused."""
    rng = random.Random(seed)
    free = list(range(1, NUM_BLOCKS))
    rng.shuffle(free)
    seqs = []
    for i in range(n):
        length = PROMPT_LENS[i % len(PROMPT_LENS)]
        seq = Sequence(
            f"r{i}", [rng.randrange(3, vocab) for _ in range(length)], SamplingParams(), 0.0, i
        )
        seq.block_ids = [free.pop() for _ in range(-(-(length + STEPS + 1) // BLOCK))]
        seqs.append(seq)
    return seqs


def spec_of(model: CausalLM) -> KVCacheSpec:
    c = model.config
    return KVCacheSpec(
        c.num_layers, c.num_kv_heads, c.head_dim, BLOCK, str(model.dtype).removeprefix("torch.")
    )


def with_padded_graphs(runner: ModelRunner, sizes: tuple[int, ...]) -> ModelRunner:
    """Give a CPU runner what a CUDA one gets: the padding block past ``kv_cache`` and a
    graph runner, here replaying eagerly on its persistent buffers."""
    storage = torch.zeros(runner.spec.shape(NUM_BLOCKS + 1), dtype=runner.kv_cache.dtype)
    runner.kv_cache = storage[:NUM_BLOCKS]
    runner.graphs = DecodeGraphRunner(
        runner.model,
        runner.backend,
        storage,
        block_size=BLOCK,
        padding_block=NUM_BLOCKS,
        max_blocks_per_seq=NUM_BLOCKS // 4,
        sizes=sizes,
        capture=False,
    )
    return runner


def prefill(runner: ModelRunner, seqs: list[Sequence]) -> None:
    """Prefill ``seqs`` in one eager batch and append each one's greedy token."""
    result = runner.execute(ScheduledBatch(prefills=[(s, s.num_tokens) for s in seqs]))
    for seq, tok in zip(result.sampled, result.logits.argmax(-1).tolist(), strict=True):
        seq.num_computed_tokens = seq.num_tokens
        seq.token_ids.append(tok)


def decode(runner: ModelRunner, seqs: list[Sequence], extra: list[Sequence] = ()) -> torch.Tensor:
    """One decode step of ``seqs`` (plus ``extra`` rows, not advanced); appends the greedy
    tokens and returns the logits of ``seqs``."""
    result = runner.execute(ScheduledBatch(decodes=[*seqs, *extra]))
    assert result.sampled == [*seqs, *extra]
    logits = result.logits[: len(seqs)]
    for seq, tok in zip(seqs, logits.argmax(-1).tolist(), strict=True):
        seq.num_computed_tokens += 1
        seq.token_ids.append(tok)
    return logits


def padding_rows(n: int) -> list[Sequence]:
    """Real sequences that eager decode turns into exactly the graph path's padding rows."""
    rows = [Sequence(f"pad{i}", [0], SamplingParams(), 0.0, 1000 + i) for i in range(n)]
    for row in rows:
        row.block_ids = [NUM_BLOCKS]
    return rows


def changed_blocks(before: torch.Tensor, after: torch.Tensor) -> set[int]:
    return set((before != after).flatten(1).any(1).nonzero().flatten().tolist())


def test_ladder_is_capped_by_max_num_seqs() -> None:
    assert ladder_sizes(256) == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert ladder_sizes(1000) == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert ladder_sizes(100) == (1, 2, 4, 8, 16, 32, 64, 100)
    assert ladder_sizes(8) == (1, 2, 4, 8)
    assert ladder_sizes(1) == (1,)
    with pytest.raises(ValueError, match="max_num_seqs"):
        ladder_sizes(0)


def test_padded_batch_size_is_the_smallest_rung_that_fits() -> None:
    sizes = ladder_sizes(256)
    assert [padded_batch_size(n, sizes) for n in (1, 2, 3, 5, 8, 9, 200, 256)] == [
        1,
        2,
        4,
        8,
        8,
        16,
        256,
        256,
    ]
    assert padded_batch_size(257, sizes) is None


def test_pad_decode_batch_points_padding_rows_at_the_padding_block() -> None:
    a = Sequence("a", [7, 8, 9, 10, 11], SamplingParams(), 0.0, 0)
    a.block_ids, a.num_computed_tokens = [5, 2], 4
    b = Sequence("b", [3, 4], SamplingParams(), 0.0, 1)
    b.block_ids, b.num_computed_tokens = [9], 1
    padded = pad_decode_batch([a, b], 4, block_size=4, padding_block=99)
    assert padded.size == 4 and padded.num_seqs == 2
    assert padded.input_ids == [11, 4, 0, 0]
    assert padded.positions == [4, 1, 0, 0]
    assert padded.slot_block_ids == [2, 9, 99, 99]
    assert padded.slot_offsets == [0, 1, 0, 0]
    assert padded.seq_lens == [5, 2, 1, 1]
    assert padded.block_tables == [[5, 2], [9], [99], [99]]
    with pytest.raises(ValueError, match="do not fit"):
        pad_decode_batch([a, b], 1, block_size=4, padding_block=99)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("num_seqs", [3, 5], ids=["3-pads-to-4", "5-pads-to-8"])
def test_padded_buffer_decode_equals_eager_decode(
    tiny: Path, backend_name: str, num_seqs: int
) -> None:
    """With the Triton kernels, bit for bit equal to eager decode of the same rows (the real
    ones, then padding rows as dummy sequences). Equal up to rounding, with the same greedy
    tokens, to eager decode of the real rows alone (matmul results depend on the row count),
    and with the torch backend (SDPA's result depends on the key length, which the buffers
    fix at the longest context). Each step writes the real rows' slot blocks and the padding
    block, nothing else."""
    exact = backend_name == "triton"
    cpu = torch.device("cpu")
    model = load_model(tiny, "float32", cpu)
    backend = get_attention_backend(backend_name, cpu)
    spec = spec_of(model)
    # NUM_BLOCKS + 1 blocks: eager padding rows write the same extra block as the graphs.
    same_rows = ModelRunner(model, spec, NUM_BLOCKS + 1, cpu, backend)
    unpadded = ModelRunner(model, spec, NUM_BLOCKS, cpu, backend)
    padded = with_padded_graphs(ModelRunner(model, spec, NUM_BLOCKS, cpu, backend), ladder_sizes(8))
    assert padded.graphs is not None
    storage = padded.graphs.kv_storage
    size = padded_batch_size(num_seqs, padded.graphs.sizes)
    vocab = model.config.vocab_size
    runs = {name: make_seqs(num_seqs, vocab) for name in ("same_rows", "unpadded", "padded")}
    prefill(same_rows, runs["same_rows"])
    prefill(unpadded, runs["unpadded"])
    prefill(padded, runs["padded"])

    for step in range(STEPS):
        slots = {s.block_ids[s.num_computed_tokens // BLOCK] for s in runs["padded"]}
        storage[NUM_BLOCKS].fill_(7.0)  # so that rewriting the padding block shows
        same_rows.kv_cache[NUM_BLOCKS].fill_(7.0)
        before = storage.clone()
        want = decode(same_rows, runs["same_rows"], padding_rows(size - num_seqs))
        near = decode(unpadded, runs["unpadded"])
        have = decode(padded, runs["padded"])
        if exact:
            assert torch.equal(have, want), f"decode step {step} differs"
            assert torch.equal(storage, same_rows.kv_cache), f"KV after step {step} differs"
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(have, near, rtol=1e-5, atol=1e-4)
        assert changed_blocks(before, storage) == slots | {NUM_BLOCKS}
    tokens = [s.token_ids for s in runs["padded"]]
    assert tokens == [s.token_ids for s in runs["unpadded"]]
    assert tokens == [s.token_ids for s in runs["same_rows"]]
    torch.testing.assert_close(padded.kv_cache, unpadded.kv_cache, rtol=1e-5, atol=1e-5)


def test_runner_on_cpu_ignores_cuda_graphs(tiny: Path) -> None:
    model = load_model(tiny, "float32", "cpu")
    backend = get_attention_backend("torch", torch.device("cpu"))
    runner = ModelRunner(
        model, spec_of(model), NUM_BLOCKS, torch.device("cpu"), backend, cuda_graphs=True
    )
    assert runner.graphs is None
    assert runner.kv_cache.shape[0] == NUM_BLOCKS and runner.kv_cache._base is None


def test_graph_runner_refuses_batches_beyond_its_buffers(tiny: Path) -> None:
    model = load_model(tiny, "float32", "cpu")
    backend = get_attention_backend("torch", torch.device("cpu"))
    runner = with_padded_graphs(
        ModelRunner(
            model, spec_of(model), NUM_BLOCKS, torch.device("cpu"), backend, cuda_graphs=False
        ),
        (1, 2, 4),
    )
    graphs = runner.graphs
    assert graphs is not None
    seqs = make_seqs(5, model.config.vocab_size)
    assert graphs.can_run(seqs[:4]) and not graphs.can_run(seqs) and not graphs.can_run([])
    long = make_seqs(1, model.config.vocab_size)[0]
    long.block_ids = list(range(NUM_BLOCKS // 4 + 1))
    assert not graphs.can_run([long])
    with pytest.raises(ValueError, match="does not fit"):
        graphs.run(seqs)
    # The runner then decodes eagerly, leaving the padding block untouched.
    prefill(runner, seqs)
    decode(runner, seqs)
    assert graphs.kv_storage[NUM_BLOCKS].abs().sum() == 0


# -- CUDA ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("num_seqs", [1, 3, 5])
@pytest.mark.parametrize("_", [pytest.param(None, marks=gpu)], ids=["cuda"])
def test_captured_graph_decode_equals_eager_decode(
    tiny: Path, dtype: str, num_seqs: int, _: None
) -> None:
    cuda = torch.device("cuda")
    model = load_model(tiny, dtype, cuda)
    backend = get_attention_backend("triton", cuda)
    eager = ModelRunner(model, spec_of(model), NUM_BLOCKS, cuda, backend, cuda_graphs=False)
    graphed = ModelRunner(
        model,
        spec_of(model),
        NUM_BLOCKS,
        cuda,
        backend,
        cuda_graphs=True,
        max_num_seqs=8,
        max_model_len=64,
    )
    assert graphed.graphs is not None and graphed.graphs.captured
    assert graphed.graphs.sizes == (1, 2, 4, 8)
    vocab = model.config.vocab_size
    seqs_eager, seqs_graphed = make_seqs(num_seqs, vocab), make_seqs(num_seqs, vocab)
    prefill(eager, seqs_eager)
    prefill(graphed, seqs_graphed)
    tol = 1e-4 if dtype == "float32" else 2e-2
    for _step in range(STEPS):
        want = decode(eager, seqs_eager)
        have = decode(graphed, seqs_graphed)
        torch.testing.assert_close(have, want, rtol=tol, atol=tol * want.abs().max().item())
        if dtype == "bfloat16":  # keep the two runs on the same tokens despite rounding
            for a, b in zip(seqs_graphed, seqs_eager, strict=True):
                a.token_ids[-1] = b.token_ids[-1]
    assert [s.token_ids for s in seqs_graphed] == [s.token_ids for s in seqs_eager]
    padding = graphed.graphs.kv_storage[NUM_BLOCKS]
    assert padding.abs().sum() > 0  # padding rows wrote there, not into the pool


@pytest.mark.parametrize("_", [pytest.param(None, marks=gpu)], ids=["cuda"])
def test_triton_engine_greedy_equals_torch_engine(tmp_path: Path, _: None) -> None:
    """Acceptance: the engine's greedy output with the Triton backend (decode through CUDA
    graphs, prefill chunked so that batches mix) equals the torch backend's (eager), and
    both equal the CPU engine's (CUDA stores some weights input-major and fuses the norms,
    rotation and SwiGLU; none of that may change a token)."""
    from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from pdserve.engine.engine import Engine
    from tests.checkpoints import make_hf_checkpoint

    path = make_hf_checkpoint(
        "llama", tmp_path / "ckpt", seed=3, max_position_embeddings=512, eos_token_id=None
    )
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 128) for _ in range(n)] for n in (1, 7, 16, 33, 100, 300)]
    params = SamplingParams(max_tokens=16, temperature=0.0)
    outputs = {}
    for name, device in (("torch", "cuda"), ("triton", "cuda"), ("cpu", "cpu")):
        engine = Engine(
            EngineConfig(
                model=str(path),
                dtype="float32",
                device=device,
                detokenize=False,
                attention_backend="torch" if name == "cpu" else name,
                cache=CacheConfig(block_size=16, num_blocks=256),
                scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=16),
            )
        )
        assert (engine.runner.graphs is not None) == (name == "triton")
        o_proj = engine.runner.model.layers[0].o_proj
        assert o_proj.t().is_contiguous() == (device == "cuda")
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, params)
        done = {}
        while engine.has_unfinished():
            done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
        outputs[name] = [done[f"r{i}"] for i in range(len(prompts))]
        del engine
    assert outputs["triton"] == outputs["torch"] == outputs["cpu"]
