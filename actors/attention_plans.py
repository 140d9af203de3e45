"""How a step's query tokens are laid out for attention, built once per step and shared by every
layer: per token for Baton's CPU decode kernel (`TokenPlan`), and unpadded runs and decode groups
for the torch path (`RaggedPlan`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from baton.actors.paged_attention import AttentionBatch

# Decode rows whose contexts are all within this many tokens share one group (see `RaggedPlan`).
GROUP_SLACK = 256
# Runs of up to this many queries (a token and its draft) join the decode groups, padded.
SHORT_RUN = 17

# A draft tree in a row: its root's query index in the row's run, its [n+1, n+1] ancestor mask.
_Tree = tuple[int, torch.Tensor]


def _layout(batch: AttentionBatch) -> tuple[list[int], list[int], dict[int, _Tree]]:
    """The step's packed query starts (B + 1), each row's context after the step, and the draft
    trees by row (their root's query index in the run, their ancestor mask)."""
    assert batch.query_start is not None  # the model runner always sets it
    trees = {row: (q0, anc) for row, q0, anc in batch.trees}
    return batch.query_start.tolist(), batch.context_lens.tolist(), trees


@dataclass(slots=True)
class TokenPlan:
    """Per packed query token: its batch row, the keys of that row it sees in full (`base`, all
    before and including itself), and a 32-bit mask over the keys after them (`bits`: a draft
    tree's node sees its ancestors, not the siblings between)."""

    rows: torch.Tensor  # [T]
    base: torch.Tensor  # [T]
    bits: torch.Tensor  # [T]

    @classmethod
    def of(cls, batch: AttentionBatch) -> TokenPlan:
        starts, ctx, trees = _layout(batch)
        rows: list[int] = []
        base: list[int] = []
        bits: list[int] = []
        for row in range(batch.batch_size):
            n = starts[row + 1] - starts[row]
            first = ctx[row] - n  # position of the run's first token
            rows.extend([row] * n)
            base.extend(range(first + 1, first + n + 1))
            bits.extend([0] * n)
            if row in trees:
                q0, anc = trees[row]
                root = first + q0
                i0 = starts[row] + q0
                for i, seen in enumerate(anc.tolist()[1:], start=1):
                    base[i0 + i] = root + 1
                    bits[i0 + i] = sum(1 << (c - 1) for c, s in enumerate(seen) if s and c)
        dev = batch.query_pos.device
        return cls(torch.tensor(rows, device=dev), torch.tensor(base, device=dev),
                   torch.tensor(bits, device=dev))


@dataclass(slots=True)
class DecodeGroup:
    """Rows of similar context with one query each (decode) or a few (a token and its draft,
    padded to the group's longest run), attended together over their own blocks."""

    rows: torch.Tensor  # [S] batch rows
    queries: torch.Tensor  # [S, Q] their packed query indices (padding repeats the last one)
    real: torch.Tensor | None  # [S * Q] which of those are not padding; None: all are
    tables: torch.Tensor  # [S, nb] their block tables, cut to the group's longest context
    mask: torch.Tensor  # [S, Q, nb * block_size]: what each query sees
    _folded: dict[int, torch.Tensor] = field(default_factory=dict)

    def folded_mask(self, groups: int) -> torch.Tensor:
        """`[1, S, groups * Q, kv]`: the mask for query rows folded as (kv-head group, query)."""
        if groups not in self._folded:
            s, q, kv = self.mask.shape
            m = self.mask.unsqueeze(1).expand(s, groups, q, kv)
            self._folded[groups] = m.reshape(1, s, groups * q, kv) if q > 1 else m.view(
                1, s, groups, kv)
        return self._folded[groups]


@dataclass(slots=True)
class RaggedRun:
    """One request's multi-token run (a prompt chunk, or a token and its draft to verify)."""

    row: int
    q0: int  # its first packed query
    n: int  # its queries: the last n of its context
    ctx: int  # context length after this step
    # [n, ctx] which keys each query sees; None: plain causal with nothing cached before it.
    mask: torch.Tensor | None


@dataclass(slots=True)
class RaggedPlan:
    """A step attended without padding to its longest row: each long run (a prompt chunk) on its
    own, decoding rows and short runs (a token and its draft, chain or tree) in groups of similar
    context. On the CPU, padding every row to the longest made a 500-token chunk beside one decode
    cost 2.2 s against 0.75 s alone, and one 1000-token decode among seven 50-token ones cost more
    than eight 1000-token ones; attending each verifying row on its own cost about 3 ms a row per
    step (thirty layers of small gathers and products), more than its draft could win."""

    runs: list[RaggedRun]
    groups: list[DecodeGroup]

    @classmethod
    def of(cls, batch: AttentionBatch) -> RaggedPlan:
        starts, ctx, trees = _layout(batch)
        runs, short = [], []
        for row in range(batch.batch_size):
            n = starts[row + 1] - starts[row]
            if n <= SHORT_RUN and n < ctx[row]:
                short.append((ctx[row], row, starts[row], n, trees.get(row)))
            else:
                runs.append(RaggedRun(row, starts[row], n, ctx[row],
                                      _run_mask(n, ctx[row], trees.get(row),
                                                batch.query_pos.device)))
        short.sort(key=lambda r: r[:2])
        bunches: list[list[_Short]] = []
        for item in short:  # a new group where the context more than doubles
            if bunches and item[0] <= max(2 * bunches[-1][0][0], GROUP_SLACK):
                bunches[-1].append(item)
            else:
                bunches.append([item])
        return cls(runs, [_decode_group(batch, bunch) for bunch in bunches])


# A short row: (context length, batch row, first packed query, queries, its draft tree if any).
_Short = tuple[int, int, int, int, "tuple[int, torch.Tensor] | None"]


def _run_mask(n: int, ctx: int, tree: tuple[int, torch.Tensor] | None,
              device: torch.device) -> torch.Tensor | None:
    """Keys each of a run's `n` queries (the last `n` of `ctx`) sees: every key up to its own,
    except inside a draft tree (root at run query q0), where a node sees only its ancestors."""
    if tree is None and n == ctx:
        return None
    qpos = torch.arange(ctx - n, ctx).unsqueeze(-1)
    mask = torch.arange(ctx) <= qpos
    if tree is not None:
        q0, anc = tree
        k0 = ctx - n + q0
        mask[q0 : q0 + anc.shape[0], k0 : k0 + anc.shape[0]] = anc.cpu()
    return mask.to(device)


def _decode_group(batch: AttentionBatch, bunch: list[_Short]) -> DecodeGroup:
    dev = batch.query_pos.device
    bs = batch.cache.spec.block_size
    rows = torch.tensor([r for _, r, *_ in bunch], device=dev)
    nb = (max(c for c, *_ in bunch) + bs - 1) // bs
    width = max(n for *_, n, _ in bunch)
    if width == 1:
        kpos = torch.arange(nb * bs, device=dev)
        mask = kpos < batch.context_lens[rows].unsqueeze(-1)
        return DecodeGroup(rows, torch.tensor([[q] for _, _, q, *_ in bunch], device=dev), None,
                           batch.block_tables[rows, :nb], mask.unsqueeze(1))
    queries, real = [], []
    mask = torch.zeros(len(bunch), width, nb * bs, dtype=torch.bool)
    for i, (ctx, _, q0, n, tree) in enumerate(bunch):
        queries.append([q0 + min(j, n - 1) for j in range(width)])
        real.extend([True] * n + [False] * (width - n))
        run = _run_mask(n, ctx, tree, torch.device("cpu"))
        assert run is not None  # a short run always has context before it
        mask[i, :n, :ctx] = run
        mask[i, n:] = mask[i, n - 1]  # padding repeats the last query
    return DecodeGroup(rows, torch.tensor(queries, device=dev), torch.tensor(real, device=dev),
                       batch.block_tables[rows, :nb], mask.to(dev))
