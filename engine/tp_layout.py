"""How a model is split over the ranks of a tensor-parallel worker (Megatron-style).

Pure Python (no torch): which rows and columns of each weight rank ``r`` of ``world`` holds.

- Attention: each rank holds ``num_heads / world`` query heads (a contiguous range) and the
  KV heads those queries read. KV heads are split as evenly as the query heads when
  ``world`` divides them; when ``world`` exceeds them each KV head is replicated on
  ``world / num_kv_heads`` consecutive ranks, as vLLM does. Every rank keeps its own heads of
  every KV block, under the same block ids as its siblings.
- MLP: gate and up are split by rows (column-parallel), down by columns (row-parallel).
- o_proj and down_proj are row-parallel: each rank computes a partial sum, one all-reduce
  per projection adds them up.
- Embedding and LM head are split by vocabulary rows; the vocabulary is padded to a
  multiple of ``world`` (the padding rows are zero and their logits are cut off).

The KV head ranges are the same as ``pdserve.kvtransfer.heads.shard_range``'s (a test
asserts it), so a KV transfer can move each rank's heads rank to rank.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Span:
    """Rows ``[start, stop)`` of a weight dimension."""

    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def check_tp(num_heads: int, num_kv_heads: int, intermediate_size: int, world: int) -> None:
    """Raise ``ValueError`` (saying which degrees would work) unless a model of these shapes
    splits over ``world`` ranks."""
    if world < 1:
        raise ValueError(f"tensor-parallel size must be at least 1, got {world}")
    problems = []
    if num_heads % world:
        problems.append(f"{num_heads} attention heads")
    if num_kv_heads % world and world % num_kv_heads:
        problems.append(f"{num_kv_heads} KV heads (nor is it a multiple of them)")
    if intermediate_size % world:
        problems.append(f"intermediate size {intermediate_size}")
    if problems:
        ok = [n for n in (1, 2, 4, 8, 16) if not num_heads % n and not intermediate_size % n
              and (not num_kv_heads % n or not n % num_kv_heads)]
        raise ValueError(
            f"tensor-parallel size {world} does not divide the model's {', '.join(problems)}; "
            f"sizes that fit this model: {', '.join(map(str, ok))}"
        )


@dataclass(frozen=True, slots=True)
class TPLayout:
    """The share of rank ``rank`` of ``world`` in a model of the given shapes."""

    rank: int
    world: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    def __post_init__(self) -> None:
        check_tp(self.num_heads, self.num_kv_heads, self.intermediate_size, self.world)
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in [0, {self.world})")

    @property
    def local_heads(self) -> int:
        return self.num_heads // self.world

    @property
    def local_kv_heads(self) -> int:
        return max(1, self.num_kv_heads // self.world)

    @property
    def kv_replicas(self) -> int:
        """How many ranks hold each KV head (1 unless ``world`` exceeds the KV heads)."""
        return max(1, self.world // self.num_kv_heads)

    def heads(self) -> Span:
        """This rank's query heads."""
        n = self.local_heads
        return Span(self.rank * n, (self.rank + 1) * n)

    def kv_heads(self) -> Span:
        """This rank's KV heads (global indices)."""
        if self.num_kv_heads % self.world == 0:
            n = self.num_kv_heads // self.world
            return Span(self.rank * n, (self.rank + 1) * n)
        head = self.rank // self.kv_replicas
        return Span(head, head + 1)

    def intermediate(self) -> Span:
        n = self.intermediate_size // self.world
        return Span(self.rank * n, (self.rank + 1) * n)

    @property
    def padded_vocab(self) -> int:
        return -(-self.vocab_size // self.world) * self.world

    @property
    def local_vocab(self) -> int:
        return self.padded_vocab // self.world

    def vocab(self) -> Span:
        """This rank's vocabulary rows; the last rank's may end before ``local_vocab``
        rows (the rest is padding)."""
        start = self.rank * self.local_vocab
        return Span(min(start, self.vocab_size), min(start + self.local_vocab, self.vocab_size))

    def rows(self, span: Span, width: int) -> Span:
        """``span`` of heads (or units) as rows of ``width`` each."""
        return Span(span.start * width, span.stop * width)
