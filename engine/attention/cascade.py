"""Cascade decode attention: a shared prefix's keys and values are read once per step for
every sequence that shares it, not once per sequence.

With prefix caching, sequences that start with the same prompt (a system prompt, a few-shot
preamble) point their block tables at the same physical blocks. Plain paged decode gathers
those blocks once per sequence per layer per step: 32 sequences on a 512-token system prompt
copy the same 32 blocks 32 times, which on a CPU is most of a decode step. Here a group's
shared blocks are attended once, as one matrix product for all the group's queries; each
sequence's own tail is attended separately; and the two partial results are merged through
their log-sum-exps (the decomposition of FlashInfer's cascade inference):

    lse = logaddexp(lse_prefix, lse_tail)
    out = out_prefix * exp(lse_prefix - lse) + out_tail * exp(lse_tail - lse)

which equals attention over the whole context up to rounding. The functions here take the
same arguments as ``pdserve.engine.attention.torch_backend.paged_decode_attention`` (the reference
they are tested against) and need the block tables on the host, so the torch backend uses
them on the CPU only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CASCADE_MIN_PREFIX_TOKENS = 64
"""A group is attended in cascade only if its members share at least this many tokens:
below it the extra products and the merge cost more than the gathers they save."""


@dataclass(frozen=True, slots=True)
class PrefixGroup:
    """Decode rows whose block tables start with the same ``prefix_blocks`` blocks, all of
    them full and before every member's newest token."""

    rows: list[int]
    prefix_blocks: int


def length_buckets(lengths: list[int], rows: list[int], ratio: float) -> list[list[int]]:
    """``rows`` split into buckets, longest first, in which every length is at least
    ``ratio`` times the bucket's longest: padding a bucket to its longest member never
    wastes more than ``1 / ratio`` of the work."""
    order = sorted(rows, key=lambda i: -lengths[i])
    buckets: list[list[int]] = []
    for i in order:
        if buckets and lengths[i] >= ratio * lengths[buckets[-1][0]]:
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


def shared_prefix_groups(
    block_tables: torch.Tensor,
    seq_lens: list[int],
    block_size: int,
    min_prefix_tokens: int = CASCADE_MIN_PREFIX_TOKENS,
) -> tuple[list[PrefixGroup], list[int]]:
    """Groups of at least two decode rows sharing at least ``min_prefix_tokens`` tokens of
    leading blocks, and the rows in no group.

    Rows are grouped by their first block, and a group shares the longest run of leading
    blocks that all its members hold, capped so that every member's newest token (whose
    slot is being written) stays outside it. ``block_tables`` must be on the host."""
    first = block_tables[:, 0].tolist() if len(seq_lens) else []
    by_first: dict[int, list[int]] = {}
    for row, block in enumerate(first):
        by_first.setdefault(block, []).append(row)
    groups: list[PrefixGroup] = []
    rest: list[int] = []
    for rows in by_first.values():
        if len(rows) < 2:
            rest.extend(rows)
            continue
        tables = block_tables[rows]
        same = (tables == tables[:1]).all(dim=0)
        common = int(same.int().cumprod(0).sum())
        cap = (min(seq_lens[r] for r in rows) - 1) // block_size
        prefix_blocks = min(common, cap)
        if prefix_blocks * block_size >= min_prefix_tokens:
            groups.append(PrefixGroup(rows, prefix_blocks))
        else:
            rest.extend(rows)
    return groups, rest


def attention_with_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention in float32 that also returns each query's log-sum-exp.

    query ``[N, Hkv, M, D]`` (M queries per KV head), key/value ``[N, Hkv, S, D]``, valid
    ``[N, 1, 1, S]`` (which keys count; every query must keep at least one) ->
    (out ``[N, Hkv, M, D]``, lse ``[N, Hkv, M]``)."""
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)).mul_(scale)
    if valid is not None:
        scores.masked_fill_(~valid, float("-inf"))
    peak = scores.amax(dim=-1, keepdim=True)
    probs = scores.sub_(peak).exp_()
    total = probs.sum(dim=-1, keepdim=True)
    out = torch.matmul(probs, value.float()).div_(total)
    return out, (peak + total.log()).squeeze(-1)


def gather_float(kv_layer: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of the blocks in ``table`` ``[N, W]`` as float32
    ``[N, Hkv, W * block, D]`` each, contiguous per head (what the products below read
    without another copy): one gather of whole blocks, then one reordering copy that also
    converts the dtype."""
    n, width = table.shape
    _, _, block_size, heads, head_dim = kv_layer.shape
    blocks = kv_layer[table.long()]  # [N, W, 2, block, Hkv, D]
    out = torch.empty((2, n, heads, width, block_size, head_dim), dtype=torch.float32)
    out.copy_(blocks.permute(2, 0, 4, 1, 3, 5))
    out = out.view(2, n, heads, width * block_size, head_dim)
    return out[0], out[1]


@dataclass(frozen=True, slots=True)
class TailBucket:
    """Rows of a cascade group whose tails (context after the shared prefix) are gathered
    together: ``rows`` index the group, ``table`` ``[len(rows), W]`` holds their tail
    blocks, ``valid`` ``[len(rows), 1, 1, W * block]`` which of those slots they hold."""

    rows: torch.Tensor
    table: torch.Tensor
    valid: torch.Tensor


@dataclass(frozen=True, slots=True)
class CascadePlan:
    """One group's work for a whole step (the same in every layer): ``rows`` of the decode
    batch, the shared blocks ``prefix_table`` ``[1, P]``, and the tail buckets."""

    rows: torch.Tensor
    prefix_table: torch.Tensor
    tails: list[TailBucket]

    @classmethod
    def build(
        cls,
        group: PrefixGroup,
        block_tables: torch.Tensor,
        seq_lens: list[int],
        block_size: int,
        bucket_ratio: float,
    ) -> CascadePlan:
        """``block_tables`` and ``seq_lens`` are the whole batch's; tails are bucketed by
        block count, the unit a gather copies (tails of 33 and 64 tokens are one gather)."""
        rows = torch.tensor(group.rows)
        tables = block_tables[rows]
        prefix = group.prefix_blocks
        tails = [seq_lens[r] - prefix * block_size for r in group.rows]
        tail_blocks = [-(-n // block_size) for n in tails]
        buckets = []
        for bucket in length_buckets(tail_blocks, list(range(len(tails))), bucket_ratio):
            width = tail_blocks[bucket[0]]
            bucket.sort()  # a single bucket then lists the group in order
            index = torch.tensor(bucket)
            positions = torch.arange(width * block_size)
            lens = torch.tensor([tails[i] for i in bucket])
            buckets.append(TailBucket(
                rows=index,
                table=tables[index, prefix : prefix + width],
                valid=(positions[None, :] < lens[:, None])[:, None, None, :],
            ))
        return cls(rows, tables[:1, :prefix], buckets)


def plan_cascade(
    block_tables: torch.Tensor,
    seq_lens: list[int],
    block_size: int,
    bucket_ratio: float,
    min_prefix_tokens: int = CASCADE_MIN_PREFIX_TOKENS,
) -> tuple[list[CascadePlan], list[int]]:
    """A decode batch's cascade work for one step: a plan per shared-prefix group, and the
    rows in no group (attended the plain way). ``block_tables`` must be on the host."""
    groups, rest = shared_prefix_groups(block_tables, seq_lens, block_size, min_prefix_tokens)
    plans = [
        CascadePlan.build(g, block_tables, seq_lens, block_size, bucket_ratio) for g in groups
    ]
    return plans, rest


def cascade_decode_group(
    query: torch.Tensor, kv_layer: torch.Tensor, plan: CascadePlan, scale: float
) -> torch.Tensor:
    """Decode attention of one cascade group: ``query`` ``[G, Hq, D]`` holds the group's
    rows in ``plan.rows`` order -> ``[G, Hq, D]`` in the query's dtype."""
    group, num_heads, head_dim = query.shape
    num_kv_heads = kv_layer.shape[3]
    per_kv = num_heads // num_kv_heads
    q = query.view(group, num_kv_heads, per_kv, head_dim)

    # The shared prefix: every query of the group against one copy of its keys.
    q_all = q.transpose(0, 1).reshape(1, num_kv_heads, group * per_kv, head_dim)
    out_p, lse_p = attention_with_lse(q_all, *gather_float(kv_layer, plan.prefix_table), scale)
    out_p = out_p.view(num_kv_heads, group, per_kv, head_dim).transpose(0, 1)
    lse_p = lse_p.view(num_kv_heads, group, per_kv).transpose(0, 1)

    # Each sequence's own tail.
    if len(plan.tails) == 1:  # the whole group, in order
        tail = plan.tails[0]
        out_t, lse_t = attention_with_lse(q, *gather_float(kv_layer, tail.table), scale, tail.valid)
    else:
        out_t = torch.empty_like(out_p)
        lse_t = torch.empty_like(lse_p)
        for tail in plan.tails:
            out_t[tail.rows], lse_t[tail.rows] = attention_with_lse(
                q[tail.rows], *gather_float(kv_layer, tail.table), scale, tail.valid
            )

    lse = torch.logaddexp(lse_p, lse_t)
    out = out_p.mul_((lse_p - lse).exp_().unsqueeze(-1))
    out.add_(out_t.mul_((lse_t - lse).exp_().unsqueeze(-1)))
    return out.reshape(group, num_heads, head_dim).to(query.dtype)
