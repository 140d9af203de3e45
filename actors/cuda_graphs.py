"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket (vLLM's practice).

On a GPU, a small model's decode step is hundreds of kernel launches driven from Python, and at
small batches the launches, not the weights, set its pace. `DecodeGraphs` captures the step once
per bucket of batch sizes (1, 2, 4, 8, then steps of 8 up to `max_batch`), on first use, and
replays it: a pure decode step (one new token per request, no draft, no layer hook) copies its
token ids, positions, KV slots, block tables and context lengths into the bucket's static
buffers and replays the graph. Rows past the batch are padding: they write their keys and values
into a scratch block the block manager never hands out, and attend only to it.

The captured forward is `LeanDecode`: the Llama-family decode step over those static tensors,
calling the model's own modules (embedding, norms, projections, rotary embedding, LM head) and
Baton's paged-attention kernel on the blocks, without transformers' per-step Python (masks,
cache positions, keyword plumbing), so nothing in it synchronizes with the host. It runs eagerly
on any device: the tests run it on the CPU, with the Triton kernel under its interpreter, against
the engine's own forward.

Steps whose requests each run a few tokens (a verify step's drafts, a short prompt; at most
16, `run_runs`) replay graphs of their own, per (batch bucket, run length): each request's run
is padded to the run length, its padding after its real tokens, writing into the scratch block,
so that every real token keeps its position and sees only what the engine's forward lets it
see (a draft tree's ancestors through the kernel's tree mask).

Each bucket's graph is checked once, right after its capture: replayed over inputs other than
the ones it was captured with, it must give the eager step's logits (up to rounding). A capture
that fails, or a replay that differs, turns the graphs off with a warning; every step then runs
the engine's own forward, as without them (a failed step of runs turns off only those).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from baton.actors.cpu_step import ARCHITECTURES, layer_unsupported
from baton.actors.kv_cache import PagedKVCache
from baton.kernels.paged_attention import paged_attention

log = logging.getLogger(__name__)

# Rotary embeddings whose frequencies never change after load (no host-side length checks).
STATIC_ROPE = frozenset({"default", "linear", "llama3", "yarn"})
WARMUP_RUNS = 2  # eager runs on the capture stream first (kernel compilation, library handles)
# A replay's logits against the eager step's, relative to their largest: rounding passes (the
# library may pick other kernels inside a capture), a stale or missing buffer does not.
CHECK_TOLERANCE = 0.02
# Tokens a request a step of short runs holds (a draft plus the token before it): its buckets.
RUN_BUCKETS = (2, 4, 8, 16)
# At most this many tokens in a step of runs, padding included: each bucket keeps logits for
# every token in its static output (128 MiB for a 128k vocabulary in bf16).
MAX_RUN_TOKENS = 512


def buckets(max_batch: int) -> list[int]:
    """The batch sizes graphs are captured for: 1, 2, 4, 8, then every 8 up to `max_batch`."""
    sizes = [b for b in (1, 2, 4) if b < max_batch]
    sizes += list(range(8, max_batch + 8, 8))
    return [b for b in sizes if b < max_batch] + [max_batch]


def unsupported(model) -> str | None:
    """Why `LeanDecode` cannot run `model` (None: it can)."""
    name = type(model).__name__
    if name not in ARCHITECTURES:
        return f"{name} is not one of {sorted(ARCHITECTURES)}"
    base = model.get_decoder()
    rope_type = getattr(base.rotary_emb, "rope_type", "default")
    if rope_type not in STATIC_ROPE:  # the others rescale with the sequence's length
        return f"rotary embedding {rope_type!r}"
    if not all(hasattr(layer.mlp, "act_fn") for layer in base.layers):
        return "a layer's MLP has no act_fn"
    return next((why for layer in base.layers if (why := layer_unsupported(layer))), None)


class LeanDecode:
    """One step of a Llama-family model over tensors of fixed shape: `ids`, `positions`, `slots`
    `[T]`, `tables [B, max_blocks]`, `context_lens [B]` -> (logits `[T, V]` in the model's
    dtype, final hidden states `[T, H]`). One token a request (`T == B`), or, with `query_start
    [B + 1]`, runs of `max_query_len` tokens a request that see each other as `tree_mask
    [T, max_query_len]` says (a verify step's drafts)."""

    def __init__(self, model, cache: PagedKVCache):
        self.model = model
        self.cache = cache
        self.base = model.get_decoder()
        config = model.config.get_text_config()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = self.base.layers[0].self_attn.head_dim

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 tables: torch.Tensor, context_lens: torch.Tensor,
                 query_start: torch.Tensor | None = None, max_query_len: int = 1,
                 tree_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b, d = ids.shape[0], self.head_dim
        hidden = self.base.embed_tokens(ids)  # [B, H]
        cos, sin = self.base.rotary_emb(hidden.unsqueeze(0), positions.unsqueeze(0))
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [B, 1, D]: every head alike
        for i, layer in enumerate(self.base.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(b, self.n_heads, d)
            k = attn.k_proj(x).view(b, self.n_kv_heads, d)
            v = attn.v_proj(x).view(b, self.n_kv_heads, d)
            if getattr(attn, "q_norm", None) is not None:
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            k_cache, v_cache = self.cache.layer(i)
            _write(k_cache, slots, k)
            _write(v_cache, slots, v)
            out = paged_attention(q, k_cache, v_cache, tables, context_lens, query_start,
                                  max_query_len, scale=attn.scaling, tree_mask=tree_mask)
            hidden = hidden + attn.o_proj(out.reshape(b, self.n_heads * d))
            x = layer.post_attention_layernorm(hidden)
            hidden = hidden + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        hidden = self.base.norm(hidden)
        return self.model.lm_head(hidden), hidden


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' `apply_rotary_pos_emb` for one of q or k, `[B, heads, D]`."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


def _write(cache: torch.Tensor, slots: torch.Tensor, new: torch.Tensor) -> None:
    """Keys or values `new [B, kv_heads, D]` into their flat `slots` of a layer's cache."""
    hkv, n, bs, d = cache.shape
    cache.view(hkv, n * bs, d).index_copy_(1, slots, new.transpose(0, 1).to(cache.dtype))


@dataclass(slots=True)
class _Bucket:
    """One (batch size, run length) bucket's static inputs and outputs, and its graph (None:
    run eagerly). Runs longer than one token carry their static `query_start` and a
    `tree_mask` filled per step."""

    ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    tables: torch.Tensor
    context_lens: torch.Tensor
    run: int = 1
    query_start: torch.Tensor | None = None
    tree_mask: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None

    def forward(self, lean: LeanDecode) -> tuple[torch.Tensor, torch.Tensor]:
        return lean(self.ids, self.positions, self.slots, self.tables, self.context_lens,
                    self.query_start, self.run, self.tree_mask)


@dataclass(slots=True)
class StepRow:
    """One request's run in a step of short runs (a verify step's drafts, a short prompt): its
    token ids, their rotary positions and KV slots, the cache length after the step, its block
    table, `mask [n, n]` (what each token sees of the run: causal, a draft tree by ancestry) and
    how many trailing tokens return logits."""

    ids: list[int]
    positions: list[int]
    slots: list[int]
    end: int
    table: list[int]
    mask: torch.Tensor
    num_logits: int


class DecodeGraphs:
    """Pure decode steps of up to `max_batch` requests through `LeanDecode`, replayed from a
    CUDA graph per bucket where `capture` (on CUDA), else run eagerly over the same padded
    inputs (what the tests on the CPU run)."""

    def __init__(self, model, cache: PagedKVCache, max_batch: int, max_blocks: int,
                 capture: bool = True):
        if cache.scratch_block is None:
            raise ValueError("decode graphs need a KV cache with a scratch block")
        self.lean = LeanDecode(model, cache)
        self.cache = cache
        self.device = cache.blocks.device
        self.block_size = cache.spec.block_size
        self.max_batch = max_batch
        self.max_blocks = max_blocks
        self.capture = capture
        self.enabled = True  # False once a capture failed: every step runs the engine's forward
        # False once a capture of a step of runs failed: those run the engine's forward, pure
        # decode steps still replay their graphs.
        self.runs_enabled = True
        self.sizes = buckets(max_batch)
        self._buckets: dict[int, _Bucket] = {}
        self._pool = None
        self.steps = 0  # steps run here
        self.run_steps = 0  # of them, steps of short runs (drafts verified)
        self.replays = 0  # of them, replayed from a graph

    @classmethod
    def build(cls, model, cache: PagedKVCache, max_batch: int, max_blocks: int
              ) -> DecodeGraphs | None:
        """Graphs for `model` on CUDA, or None where they do not apply (another device, an
        architecture `LeanDecode` does not run, a cache without a scratch block)."""
        why = None if cache.blocks.device.type == "cuda" else "not on CUDA"
        why = why or unsupported(model) or (
            "no scratch KV block" if cache.scratch_block is None else None)
        if why:
            log.debug("decode steps run eagerly: %s", why)
            return None
        return cls(model, cache, max_batch, max_blocks)

    def fits(self, num_rows: int) -> bool:
        """Whether a pure decode step of `num_rows` requests runs here."""
        return self.enabled and 0 < num_rows <= self.max_batch

    @torch.inference_mode()
    def run(self, tokens: list[int], positions: list[int], block_tables: list[list[int]]
            ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(logits `[B, V]`, hidden `[B, H]`) of one decode step: request b's token
        `tokens[b]` at `positions[b]`, its blocks `block_tables[b]`. Views of static buffers:
        use them before the next call. None: this call's capture failed, and the graphs are
        off (run the step elsewhere)."""
        b = len(tokens)
        bucket = self._bucket(next(size for size in self.sizes if size >= b))
        if not self.enabled:
            return None
        self.steps += 1
        self._fill(bucket, tokens, positions, block_tables)
        logits, hidden = self._replay(bucket)
        return logits[:b], hidden[:b]

    def fits_runs(self, run_lengths: list[int]) -> bool:
        """Whether a step whose requests run these many tokens each runs here."""
        if not (self.enabled and self.runs_enabled and 0 < len(run_lengths) <= self.max_batch
                and max(run_lengths) <= RUN_BUCKETS[-1]):
            return False
        size, run = self._runs_bucket(len(run_lengths), max(run_lengths))
        return size * run <= MAX_RUN_TOKENS

    def _runs_bucket(self, num_rows: int, longest: int) -> tuple[int, int]:
        """(batch size, run length) of the bucket a step of runs takes."""
        return (next(size for size in self.sizes if size >= num_rows),
                next(r for r in RUN_BUCKETS if r >= longest))

    @torch.inference_mode()
    def run_runs(self, rows: list[StepRow]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(logits, hidden) of every row's `num_logits` trailing tokens, in order, for a step
        of short runs (see `fits_runs`): each request's run padded to the bucket's run length,
        its padding tokens written to the scratch block and seen by no real token. None: this
        call's capture failed, and the graphs are off."""
        bucket = self._bucket(*self._runs_bucket(len(rows), max(len(row.ids) for row in rows)))
        if not (self.enabled and self.runs_enabled):
            return None
        self.steps += 1
        self.run_steps += 1
        keep = self._fill_runs(bucket, rows)
        logits, hidden = self._replay(bucket)
        return logits.index_select(0, keep), hidden.index_select(0, keep)

    def _replay(self, bucket: _Bucket) -> tuple[torch.Tensor, torch.Tensor]:
        if bucket.graph is None:
            return bucket.forward(self.lean)
        bucket.graph.replay()
        self.replays += 1
        assert bucket.logits is not None and bucket.hidden is not None
        return bucket.logits, bucket.hidden

    def _fill_runs(self, bucket: _Bucket, rows: list[StepRow]) -> torch.Tensor:
        """Copy `rows` into `bucket`'s buffers; the rows of the tokens that return logits."""
        run, bs = bucket.run, self.block_size
        scratch = self.cache.scratch_block
        assert scratch is not None and bucket.tree_mask is not None
        size, width = bucket.context_lens.shape[0], bucket.tables.shape[1]
        # Padding: token 0 at positions 0.., written to the scratch block's first slot; padding
        # requests hold `run` tokens of the scratch block and see only those.
        ids, positions = [0] * (size * run), [0] * (size * run)
        slots = [scratch * bs] * (size * run)
        ends = [run] * size
        tables = torch.full((size, width), scratch, dtype=torch.long)
        mask = torch.ones(run, run, dtype=torch.bool).tril().repeat(size, 1)
        keep: list[int] = []
        for i, row in enumerate(rows):
            n, lo = len(row.ids), i * run
            ids[lo : lo + n], slots[lo : lo + n] = row.ids, row.slots
            positions[lo : lo + run] = row.positions + [row.positions[-1]] * (run - n)
            # The run ends `run - n` padding positions past the cache, so each real token keeps
            # its place (`context - run + j`); the padding comes after every real token.
            ends[i] = row.end + run - n
            tables[i, : len(row.table)] = torch.tensor(row.table)
            mask[lo : lo + n, :n] = row.mask
            mask[lo : lo + n, n:] = False
            keep.extend(range(lo + n - row.num_logits, lo + n))
        non_blocking = self.device.type == "cuda"
        host = torch.tensor([ids, positions, slots])
        for dst, src in zip((bucket.ids, bucket.positions, bucket.slots), host, strict=True):
            dst.copy_(src, non_blocking=non_blocking)
        bucket.context_lens.copy_(torch.tensor(ends), non_blocking=non_blocking)
        bucket.tables.copy_(tables, non_blocking=non_blocking)
        bucket.tree_mask.copy_(mask, non_blocking=non_blocking)
        return torch.tensor(keep, device=self.device)

    def _fill(self, bucket: _Bucket, tokens: list[int], positions: list[int],
              block_tables: list[list[int]]) -> None:
        size, b, bs = len(bucket.ids), len(tokens), self.block_size
        scratch = self.cache.scratch_block
        assert scratch is not None
        pad = size - b
        slots = [table[p // bs] * bs + p % bs for table, p in zip(block_tables, positions,
                                                                   strict=True)]
        tables = torch.full((size, self.max_blocks), scratch, dtype=torch.long)
        for row, table in enumerate(block_tables):
            tables[row, : len(table)] = torch.tensor(table)
        # Padding rows: token 0 at position 0, written to the scratch block's first slot and
        # attending only to it.
        host = torch.tensor([tokens + [0] * pad, positions + [0] * pad,
                             slots + [scratch * bs] * pad,
                             [p + 1 for p in positions] + [1] * pad])
        non_blocking = self.device.type == "cuda"
        for dst, src in zip((bucket.ids, bucket.positions, bucket.slots, bucket.context_lens),
                            host, strict=True):
            dst.copy_(src, non_blocking=non_blocking)
        bucket.tables.copy_(tables, non_blocking=non_blocking)

    def _bucket(self, size: int, run: int = 1) -> _Bucket:
        bucket = self._buckets.get((size, run))
        if bucket is None:
            dev = self.device
            # A run's padding reaches `run - 1` positions past its request's cache.
            width = self.max_blocks + (-(-(run - 1) // self.block_size) if run > 1 else 0)
            tokens = size * run
            bucket = _Bucket(*(torch.zeros(tokens, dtype=torch.long, device=dev)
                               for _ in range(3)),
                             tables=torch.zeros(size, width, dtype=torch.long, device=dev),
                             context_lens=torch.full((size,), run, dtype=torch.long,
                                                     device=dev),
                             run=run)
            if run > 1:
                bucket.query_start = torch.arange(0, tokens + 1, run, device=dev)
                bucket.tree_mask = torch.ones(run, run, dtype=torch.bool,
                                              device=dev).tril().repeat(size, 1)
            bucket.slots.fill_(self.cache.scratch_block * self.block_size)
            bucket.tables.fill_(self.cache.scratch_block)
            if self.capture:
                self._capture(bucket)
            self._buckets[(size, run)] = bucket
        return bucket

    def _capture(self, bucket: _Bucket) -> None:
        """Capture `bucket`'s graph over padding-only inputs, then check a replay over other
        inputs against the eager step; on any failure, turn the graphs off (`fits` says no, and
        the engine's own forward runs every step)."""
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(WARMUP_RUNS):
                    bucket.forward(self.lean)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                bucket.logits, bucket.hidden = bucket.forward(self.lean)
            # The replay must read the buffers as they are now, not as they were at capture.
            bucket.ids.fill_(1)
            graph.replay()
            got = bucket.logits.float()
            want = bucket.forward(self.lean)[0].float()
            bucket.ids.zero_()
            torch.cuda.synchronize(self.device)
            if not (got - want).abs().max() <= CHECK_TOLERANCE * want.abs().max():
                raise RuntimeError("a replay's logits differ from the eager step's")
        except Exception as exc:  # noqa: BLE001 - graphs are an optimization: run eagerly
            if bucket.run > 1:
                log.warning("CUDA graphs are off for steps of runs (verify steps): capturing "
                            "%d rows of %d tokens failed (%s); they run eagerly",
                            len(bucket.context_lens), bucket.run, exc)
                self.runs_enabled = False
                return
            log.warning("CUDA graphs are off for this engine: capturing a decode step of %d "
                        "rows failed (%s); decode steps run eagerly", len(bucket.context_lens),
                        exc)
            self.enabled = False
            return
        bucket.graph = graph
        log.info("captured a CUDA graph for steps of up to %d requests of %d tokens",
                 len(bucket.context_lens), bucket.run)
