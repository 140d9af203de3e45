"""Paged attention plugged into transformers' attention interface.

Every request's new tokens run packed into one sequence (`[1, T]`); the attention function writes
their keys and values into the paged cache at `slot_mapping`, gathers each request's blocks, and
attends with per-request masks. Per-step metadata (`AttentionBatch`) is built once by the model
runner and shared by all layers; it reaches the attention function through a context variable.

Shapes inside: the batch runs as `[kv_heads, B, ...]` (the cache's own order), each kv head's
query group folded into the query axis, so grouped-query attention never repeats keys.
On CUDA, decode and verify steps (one query per request, or a short run of draft tokens, chains
and trees alike) run `baton.kernels.paged_attention` straight on the blocks instead, gathering
nothing; steps with a long prompt chunk gather.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from baton.actors.attention_plans import SHORT_RUN, RaggedPlan, TokenPlan
from baton.actors.kv_cache import PagedKVCache
from baton.kernels import cpu_decode
from baton.kernels.dispatch import backend
from baton.kernels.paged_attention import paged_attention

ATTN_IMPLEMENTATION = "baton_paged"
# Up to this many query rows per kv head, explicit matmuls beat SDPA's CPU kernel (decode).
_MATMUL_MAX_ROWS = 64
# The paged kernel holds a kv head's whole query group of a sequence in one tile: up to this many
# rows (padded to powers of two) it runs the step, past it (prompt chunks) the gather path does.
_KERNEL_MAX_ROWS = 128


@dataclass(slots=True)
class AttentionBatch:
    """Where this step's tokens go in the cache and what each may attend to.

    `q_index` scatters packed tokens into a `[B * max_query_len]` padded layout; it is None when
    every request runs exactly one token (pure decode), where packed and padded coincide. Keys are
    gathered whole blocks at a time, so the key axis is `max_blocks * block_size` long and the
    mask hides what lies past each request's context.
    """

    cache: PagedKVCache
    slot_mapping: torch.Tensor  # [T] flat slot of each new token
    block_tables: torch.Tensor  # [B, max_blocks]
    query_pos: torch.Tensor  # [B, max_query_len] absolute position of each query (-1 = padding)
    context_lens: torch.Tensor  # [B] tokens in cache after this step
    max_context_len: int
    max_query_len: int
    q_index: torch.Tensor | None
    query_start: torch.Tensor | None = None  # [B + 1] cumulative query counts (packed rows)
    on_layer_done: Callable[[int], None] | None = None
    # Draft trees: (batch row, query index of the tree's root, [n+1, n+1] ancestor mask).
    trees: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)
    _masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    _tree_mask: torch.Tensor | None = None
    _ragged: RaggedPlan | None = None
    _tokens: TokenPlan | None = None

    @property
    def batch_size(self) -> int:
        return self.block_tables.shape[0]

    @property
    def kv_len(self) -> int:
        return self.block_tables.shape[1] * self.cache.spec.block_size

    def mask(self, groups: int, window: int | None) -> torch.Tensor:
        """Boolean mask `[1, B, groups * max_query_len, kv_len]`, built once per step."""
        key = (groups, window or 0)
        if key not in self._masks:
            kpos = torch.arange(self.kv_len, device=self.query_pos.device)
            qpos = self.query_pos.unsqueeze(-1)  # [B, Q, 1]
            m = kpos <= qpos
            if window:
                m &= kpos > qpos - window
            m &= kpos < self.context_lens.view(-1, 1, 1)
            for row, q0, anc in self.trees:
                k0 = int(self.query_pos[row, q0])
                n = anc.shape[0]
                m[row, q0 : q0 + n, k0 : k0 + n] = anc.to(m.device)
            m[:, :, 0] |= self.query_pos < 0  # padded query rows attend to something: no NaN
            self._masks[key] = m.repeat(1, groups, 1).unsqueeze(0)
        return self._masks[key]

    def ragged(self, window: int | None) -> RaggedPlan | None:
        """How to attend without padding every row to the longest (None: one row, or a sliding
        window, which the plan cannot express)."""
        if self.batch_size == 1 or window:
            return None
        if self._ragged is None:
            self._ragged = RaggedPlan.of(self)
        return self._ragged

    def token_plan(self) -> TokenPlan | None:
        """What each query token sees, for Baton's CPU decode attention (None: a run longer
        than `SHORT_RUN`, such as a prompt chunk, which the gather path handles better)."""
        if self._tokens is None and self.max_query_len <= SHORT_RUN:
            self._tokens = TokenPlan.of(self)
        return self._tokens

    def fits_kernel(self, groups: int) -> bool:
        """Whether the paged kernel can run this step (see `_KERNEL_MAX_ROWS`)."""
        rows = 1 << (groups - 1).bit_length()
        rows *= 1 << (self.max_query_len - 1).bit_length()
        return rows <= _KERNEL_MAX_ROWS and (self.max_query_len == 1
                                             or self.query_start is not None)

    def tree_mask(self) -> torch.Tensor | None:
        """`[T, max_query_len]` packed rows' view of their own run (causal, draft trees by
        ancestry), for the kernel; None without trees. Built once per step."""
        if not self.trees:
            return None
        if self._tree_mask is None:
            q = self.max_query_len
            causal = torch.ones(q, q, dtype=torch.bool).tril()
            starts = self.query_start.tolist()  # set whenever a step carries a draft
            m = torch.zeros(starts[-1], q, dtype=torch.bool)
            for b in range(self.batch_size):
                n = starts[b + 1] - starts[b]
                m[starts[b]:starts[b + 1], :n] = causal[:n, :n]
            for row, q0, anc in self.trees:
                n = anc.shape[0]
                lo = starts[row] + q0
                m[lo:lo + n, q0:q0 + n] = anc
            self._tree_mask = m.to(self.query_pos.device)
        return self._tree_mask


def _ragged_attention(plan: RaggedPlan, batch: AttentionBatch, q: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, scaling: float
                      ) -> torch.Tensor:
    """`q [T, H, D]` packed -> `[T, H, D]`, per `plan`."""
    t, n_heads, d = q.shape
    n_kv = k_cache.shape[0]
    groups = n_heads // n_kv
    bs = batch.cache.spec.block_size
    out = q.new_empty(t, n_heads, d)
    for run in plan.runs:
        q0, n, ctx = run.q0, run.n, run.ctx
        blocks = batch.block_tables[run.row : run.row + 1, : (ctx + bs - 1) // bs]
        keys = gather_kv(k_cache, blocks)[:, :, :ctx].transpose(0, 1)  # [1, Hkv, ctx, D]
        values = gather_kv(v_cache, blocks)[:, :, :ctx].transpose(0, 1)
        qr = q[q0 : q0 + n].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if run.mask is None:  # nothing cached before the run: plain causal attention
            o = F.scaled_dot_product_attention(qr, keys, values, is_causal=True, scale=scaling,
                                               enable_gqa=groups > 1)
        else:
            o = F.scaled_dot_product_attention(qr, keys, values, attn_mask=run.mask,
                                               scale=scaling, enable_gqa=groups > 1)
        out[q0 : q0 + n] = o[0].transpose(0, 1)
    for group in plan.groups:
        keys = gather_kv(k_cache, group.tables)
        values = gather_kv(v_cache, group.tables)
        s, width = group.queries.shape
        # [S * Q, H, D] -> [Hkv, S, G * Q, D], query rows as (kv-head group, query)
        qs = q[group.queries.flatten()].view(s, width, n_kv, groups, d).permute(2, 0, 3, 1, 4)
        o = _matmul_attention(qs.reshape(n_kv, s, groups * width, d), keys, values,
                              group.folded_mask(groups), scaling)
        o = o.view(n_kv, s, groups, width, d).permute(1, 3, 0, 2, 4).reshape(s * width, n_heads, d)
        if group.real is None:
            out[group.queries.flatten()] = o
        else:
            out[group.queries.flatten()[group.real]] = o[group.real]
    return out


_current: ContextVar[AttentionBatch | None] = ContextVar("baton_attention_batch", default=None)


def current_batch() -> AttentionBatch | None:
    """The step whose attention is running (inside `attention_batch`), else None."""
    return _current.get()


@contextlib.contextmanager
def attention_batch(batch: AttentionBatch) -> Iterator[None]:
    token = _current.set(batch)
    try:
        yield
    finally:
        _current.reset(token)


def write_kv(cache: torch.Tensor, slots: torch.Tensor, new: torch.Tensor) -> None:
    """Store `new [Hkv, T, D]` at flat `slots` of a `[Hkv, N, bs, D]` cache."""
    hkv, n, bs, d = cache.shape
    cache.view(hkv, n * bs, d).index_copy_(1, slots, new.to(cache.dtype))


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """The blocks of each row of `block_tables [B, nb]` -> `[Hkv, B, nb * bs, D]` (one copy)."""
    b, nb = block_tables.shape
    hkv, _, bs, d = cache.shape
    return cache.index_select(1, block_tables.flatten()).view(hkv, b, nb * bs, d)


def _matmul_attention(q, keys, values, mask, scaling):
    # transformers' eager recipe: scores in the model dtype, softmax in float32. On the CPU the
    # whole product runs in float32: x86 parts without AVX-512 BF16 have no fast half-precision
    # batched matmul (measured 3-5x slower than upcasting these decode-sized operands).
    dtype = q.dtype
    if q.device.type == "cpu" and dtype != torch.float32:
        q, keys, values = q.float(), keys.float(), values.float()
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, values).to(dtype)


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: `query [1, H, T, D]`, `key/value [1, Hkv, T, D]`."""
    batch = _current.get()
    if batch is None:
        raise RuntimeError("baton_paged attention called outside an engine step")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("baton_paged attention has no logit soft-capping")
    k_cache, v_cache = batch.cache.layer(module.layer_idx)
    _, n_heads, t, d = query.shape
    n_kv = key.shape[1]
    groups = n_heads // n_kv
    scaling = d**-0.5 if scaling is None else scaling
    write_kv(k_cache, batch.slot_mapping, key[0])
    write_kv(v_cache, batch.slot_mapping, value[0])
    if batch.on_layer_done is not None:
        batch.on_layer_done(module.layer_idx)
    tokens = query[0].transpose(0, 1)  # [T, H, D]
    if backend(query.device) == "triton" and batch.fits_kernel(groups):
        varlen = batch.max_query_len > 1
        out = paged_attention(tokens, k_cache, v_cache, batch.block_tables,
                              batch.context_lens,
                              query_start=batch.query_start if varlen else None,
                              max_query_len=batch.max_query_len, scale=scaling,
                              sliding_window=sliding_window, tree_mask=batch.tree_mask())
        return out.unsqueeze(0), None
    if not sliding_window and cpu_decode.takes_decode_attention(tokens, k_cache):
        plan = batch.token_plan()
        if plan is not None:  # a bf16 CPU decode or verify step: Baton's C++ kernel
            out = cpu_decode.decode_attention(tokens, k_cache, v_cache, batch.block_tables,
                                              plan.rows, plan.base, plan.bits, scaling)
            return out.unsqueeze(0), None
    ragged = batch.ragged(sliding_window)
    if ragged is not None:
        out = _ragged_attention(ragged, batch, tokens, k_cache, v_cache, scaling)
        return out.unsqueeze(0), None
    keys = gather_kv(k_cache, batch.block_tables)
    values = gather_kv(v_cache, batch.block_tables)

    b, qlen = batch.batch_size, batch.max_query_len
    decode_on_cpu = qlen == 1 and query.device.type == "cpu"
    if (b == 1 and not sliding_window and not batch.trees and not decode_on_cpu
            and (qlen == 1 or qlen == batch.max_context_len)):
        # One request with nothing cached before its queries: plain causal attention, the very
        # call transformers' own sdpa path makes. (CPU decode takes the float32 matmuls below:
        # SDPA's CPU kernel costs about a millisecond for one query in half precision.)
        length = batch.max_context_len
        k1 = keys[:, :, :length].transpose(0, 1)
        v1 = values[:, :, :length].transpose(0, 1)
        out = F.scaled_dot_product_attention(
            query, k1, v1, is_causal=qlen > 1, scale=scaling, enable_gqa=groups > 1
        )
        return out.transpose(1, 2), None

    q = tokens
    if batch.q_index is not None:
        padded = q.new_zeros(b * qlen, n_heads, d)
        padded.index_copy_(0, batch.q_index, q)
        q = padded
    # [B*Q, Hkv*G, D] -> [Hkv, B, G*Q, D]
    q = q.view(b, qlen, n_kv, groups, d).permute(2, 0, 3, 1, 4).reshape(n_kv, b, groups * qlen, d)
    mask = batch.mask(groups, sliding_window)
    if groups * qlen <= _MATMUL_MAX_ROWS:
        out = _matmul_attention(q, keys, values, mask, scaling)
    else:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)
    # [Hkv, B, G*Q, D] -> [B*Q, H, D]
    out = out.view(n_kv, b, groups, qlen, d).permute(1, 3, 0, 2, 4).reshape(b * qlen, n_heads, d)
    if batch.q_index is not None:
        out = out.index_select(0, batch.q_index)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
