"""Cascade decode attention against the reference ``paged_decode_attention``: which rows are
grouped, and that attending a shared prefix once gives the same result as per sequence."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.attention.base import AttentionMetadata
from pdserve.engine.attention.cascade import (
    CascadePlan,
    PrefixGroup,
    cascade_decode_group,
    length_buckets,
    shared_prefix_groups,
)
from pdserve.engine.attention.torch_backend import TorchAttentionBackend, paged_decode_attention

NUM_LAYERS, LAYER = 2, 1


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def paged_batch(
    gen: torch.Generator,
    dtype: torch.dtype,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    families: list[tuple[int, list[int]]],
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """A random cache and padded block tables: each family ``(prefix_blocks, seq_lens)``
    is a set of sequences whose first ``prefix_blocks`` table entries are the same physical
    blocks and whose remaining blocks are their own; all blocks in random pool order."""
    counts = [
        (prefix, [-(-n // block_size) - prefix for n in lens]) for prefix, lens in families
    ]
    num_blocks = sum(p + sum(own) for p, own in counts) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    cache = torch.randn(
        (num_blocks, NUM_LAYERS, 2, block_size, num_kv_heads, head_dim), generator=gen
    ).to(dtype)
    rows: list[list[int]] = []
    seq_lens: list[int] = []
    for (prefix, own), (_, lens) in zip(counts, families, strict=True):
        shared = [order.pop() for _ in range(prefix)]
        for n, k in zip(lens, own, strict=True):
            rows.append(shared + [order.pop() for _ in range(k)])
            seq_lens.append(n)
    width = max(len(r) for r in rows) + 1
    tables = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32)
    return cache[:, LAYER], tables, seq_lens


def test_length_buckets_keep_each_bucket_within_the_ratio() -> None:
    lengths = [100, 10, 80, 76, 9, 40, 5]
    assert length_buckets(lengths, list(range(7)), 0.75) == [[0, 2, 3], [5], [1, 4], [6]]
    assert length_buckets(lengths, [1, 4, 6], 0.5) == [[1, 4, 6]]


def test_shared_prefix_groups_share_only_blocks_before_every_newest_token() -> None:
    block = 4
    tables = torch.tensor(
        [
            [7, 8, 9, 10, 11, 0],  # family A: 7 8 9 shared by rows 0, 1, 3
            [7, 8, 9, 20, 21, 0],
            [5, 8, 9, 10, 0, 0],  # starts elsewhere: alone
            [7, 8, 9, 10, 30, 31],  # shares 7 8 9 10 with row 0, but row 1 not block 10
            [40, 41, 42, 43, 44, 0],  # family B: 40 41 42 43 44 shared by rows 4 and 5 ...
            [40, 41, 42, 43, 44, 0],  # ... but row 5's newest token sits in block 44
            [50, 51, 0, 0, 0, 0],  # family C: 2 shared blocks, under the minimum
            [50, 51, 52, 0, 0, 0],
        ],
        dtype=torch.int32,
    )
    lens = [20, 19, 13, 24, 20, 18, 8, 10]
    groups, rest = shared_prefix_groups(tables, lens, block, min_prefix_tokens=12)
    assert groups == [PrefixGroup([0, 1, 3], 3), PrefixGroup([4, 5], 4)]
    assert rest == [2, 6, 7]
    # Under a higher minimum family B (16 tokens) stays, family A (12) joins the rest.
    groups, rest = shared_prefix_groups(tables, lens, block, min_prefix_tokens=16)
    assert groups == [PrefixGroup([4, 5], 4)]
    assert sorted(rest) == [0, 1, 2, 3, 6, 7]


# (block_size, num_kv_heads, query heads per KV head, head_dim)
SHAPES = [(16, 2, 5, 64), (8, 1, 8, 32), (4, 4, 1, 64)]


# Tails (context after the shared prefix) in blocks + tokens: one token (the newest
# alone), one full block plus one, and long ones in other buckets; or tails that all fit
# one bucket.
TAILS = {
    "mixed": [(0, 1), (1, 1), (0, 3), (9, 0), (4, 2), (0, 2)],
    "even": [(3, 1), (2, 5), (3, 0), (2, 2)],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "bs{}-kv{}-g{}-d{}".format(*s))
@pytest.mark.parametrize("tails", sorted(TAILS))
def test_cascade_group_equals_reference(
    dtype: torch.dtype, shape: tuple[int, ...], tails: str
) -> None:
    block, kv_heads, per_kv, head_dim = shape
    gen = torch.Generator().manual_seed(sum(shape))
    prefix = 6
    lens = [(prefix + blocks) * block + tokens for blocks, tokens in TAILS[tails]]
    kv_layer, tables, seq_lens = paged_batch(
        gen, dtype, block, kv_heads, head_dim, [(prefix, lens)]
    )
    query = torch.randn((len(lens), kv_heads * per_kv, head_dim), generator=gen).to(dtype)
    scale = head_dim**-0.5
    plan = CascadePlan.build(
        PrefixGroup(list(range(len(lens))), prefix), tables, seq_lens, block, 0.75
    )
    assert len(plan.tails) == (4 if tails == "mixed" else 1)
    out = cascade_decode_group(query, kv_layer, plan, scale)
    # The reference in float32 on the same (possibly bf16-rounded) keys and values.
    ref = paged_decode_attention(
        query.float(), kv_layer.float(), tables, torch.tensor(seq_lens), scale
    )
    assert out.dtype == dtype and out.shape == query.shape
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backend_decode_mixes_cascade_groups_and_plain_rows(dtype: torch.dtype) -> None:
    block, kv_heads, per_kv, head_dim = 8, 2, 4, 64
    gen = torch.Generator().manual_seed(5)
    families = [
        (10, [83, 97, 81, 120]),  # a long shared prefix and tails of several lengths
        (0, [33]),  # no sharing
        (12, [100, 130]),  # a second group
        (0, [5, 240]),
    ]
    kv_layer, tables, lens = paged_batch(gen, dtype, block, kv_heads, head_dim, families)
    query = torch.randn((len(lens), kv_heads * per_kv, head_dim), generator=gen).to(dtype)
    meta = AttentionMetadata(
        slot_block_ids=torch.zeros(len(lens), dtype=torch.int64),
        slot_offsets=torch.zeros(len(lens), dtype=torch.int64),
        num_decodes=len(lens),
        decode_block_tables=tables,
        decode_seq_lens=torch.tensor(lens, dtype=torch.int32),
        prefill_query_start_loc=torch.zeros(1, dtype=torch.int32),
        prefill_seq_lens=torch.zeros(0, dtype=torch.int32),
        prefill_block_tables=torch.zeros((0, 1), dtype=torch.int32),
        prefill_query_lens_cpu=[],
        prefill_seq_lens_cpu=[],
        max_decode_seq_len=max(lens),
        decode_seq_lens_cpu=lens,
    )
    out = torch.full_like(query, float("nan"))
    TorchAttentionBackend(cascade=True).decode(query, kv_layer, meta, head_dim**-0.5, out)
    plans, rest = meta.backend_plan
    assert [p.rows.tolist() for p in plans] == [[0, 1, 2, 3], [5, 6]]
    assert [p.prefix_table.tolist() for p in plans] == [tables[:1, :10].tolist(),
                                                         tables[5:6, :12].tolist()]
    assert sorted(rest) == [4, 7, 8]
    ref = paged_decode_attention(
        query.float(), kv_layer.float(), tables, meta.decode_seq_lens, head_dim**-0.5
    )
    assert not out.isnan().any()
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    plain = torch.full_like(query, float("nan"))
    meta.backend_plan = None
    TorchAttentionBackend(cascade=False).decode(query, kv_layer, meta, head_dim**-0.5, plain)
    assert meta.backend_plan is None
    assert rel_err(out, plain) < (1e-5 if dtype == torch.float32 else 1e-2)
