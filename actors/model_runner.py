"""Loads the model and runs one scheduled step on the paged KV cache."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from baton.actors import cpu_step, paged_attention
from baton.actors.cpu_linear import pack_linears, packing_supported
from baton.actors.cpu_norm import use_kernel_norms
from baton.actors.cpu_step import CpuDecodeStep
from baton.actors.cuda_graphs import DecodeGraphs, StepRow
from baton.actors.draft_tree import DraftTree
from baton.actors.kv_cache import PagedKVCache
from baton.actors.model_source import ModelSource
from baton.actors.moe_experts import use_baton_experts
from baton.actors.pregate import attach as attach_pregate
from baton.actors.quantized_linear import quantize_linears
from baton.actors.scheduler import SchedulerOutput
from baton.errors import ModelLoadError, ModelNotFoundError

log = logging.getLogger(__name__)


def load_model(source: ModelSource, dtype: torch.dtype, device: torch.device,
               quantization: str | None = None, group_size: int | None = None,
               on_host: Callable[[Any], None] | None = None):
    """(model, tokenizer) for a resolved source, with Baton's paged attention plugged in.

    `quantization` ("int8" or "int4" in groups of `group_size`; None: the largest that fits)
    makes the linears weight-only quantized. `on_host(model)` runs while the model is still in
    host memory, before it moves to `device` (MoE offload takes the experts out there, so they
    never reach the device).
    """
    quant = (quantization, group_size)
    attn = paged_attention.ATTN_IMPLEMENTATION
    if source.kind == "tiny":
        from baton.actors.tiny import tiny_model, tiny_tokenizer

        arch = source.spec.split(":", 1)[1]
        model = tiny_model(arch, dtype, attn)
        if on_host is not None:
            on_host(model)
        return prepare_for_inference(model.to(device), dtype, device, *quant), tiny_tokenizer()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path)
        model = AutoModelForCausalLM.from_pretrained(
            source.path, dtype=dtype, attn_implementation=attn
        )
    except OSError as exc:
        if source.kind == "hub":
            raise ModelNotFoundError(
                f"cannot load {source.spec!r} from the Hugging Face hub or its local cache: {exc}"
            ) from exc
        raise ModelLoadError(f"cannot load model from {source.path}: {exc}") from exc
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"model at {source.path} is not a decoder-only model transformers can run: {exc}"
        ) from exc
    if model.config.is_encoder_decoder:
        raise ModelLoadError(f"{source.spec!r} is an encoder-decoder model; Baton serves decoders")
    attach_pregate(model, source.path)
    if on_host is not None:
        on_host(model)
    return prepare_for_inference(model.to(device).eval(), dtype, device, *quant), tokenizer


def prepare_for_inference(model, dtype: torch.dtype, device: torch.device,
                          quantization: str | None = None, group_size: int | None = None):
    """Check the model fits Baton's attention, then apply run-time conversions: MoE layers on
    Baton's grouped GEMM (CUDA), weight-only quantization if asked for, then packed CPU linears
    (which keep results bit for bit) and, in bf16 on the CPU, RMSNorms on Baton's kernel."""
    text = model.config.get_text_config()
    if getattr(text, "attn_logit_softcapping", None):
        raise ModelLoadError(
            f"{type(model).__name__} caps attention logits (attn_logit_softcapping), which "
            "Baton's paged attention does not support yet; choose another model"
        )
    use_baton_experts(model, device)
    if quantization:
        quantize_linears(model, quantization, group_size)
    if packing_supported(dtype, device):
        pack_linears(model)
    if device.type == "cpu" and dtype == torch.bfloat16:
        use_kernel_norms(model)
    return model


@dataclass(slots=True)
class BatchRow:
    """One request's slice of a forward pass: `num_tokens` tokens of `token_ids` from `start`.

    `num_logits` trailing rows return logits (0: a prompt chunk that samples nothing). `tree`,
    when given, is a draft occupying the last `len(tree)` tokens: its nodes take positions by
    depth and attend only to their ancestors.
    """

    token_ids: list[int]
    start: int
    num_tokens: int
    block_table: list[int]
    num_logits: int
    tree: DraftTree | None = None


def scheduled_rows(out: SchedulerOutput) -> list[BatchRow]:
    """The rows of a scheduled step: a request whose run reaches its last token samples from it
    (and from every token of an attached draft)."""
    rows = []
    for seq in out.seqs:
        n = out.num_scheduled_tokens[seq.request_id]
        start = seq.num_computed_tokens
        num_logits = 0
        if start + n == len(seq):
            num_logits = 1 + seq.num_draft_tokens
        tree = seq.draft if seq.draft is not None and not seq.draft.is_chain else None
        rows.append(BatchRow(seq.token_ids, start, n, seq.block_table, num_logits, tree))
    return rows


class ModelRunner:
    """Turns a batch of rows into one packed forward pass and the logits to sample from."""

    def __init__(self, model, cache: PagedKVCache, device: torch.device):
        self.model = model
        self.cache = cache
        self.device = device
        self.block_size = cache.spec.block_size
        # With `capture_hidden`, the final hidden states (what the LM head reads) of the rows
        # that returned logits, in the same order: Medusa heads draft from them.
        self.last_hidden: torch.Tensor | None = None
        # Decode-sized steps skip transformers' modules where the model allows (bf16
        # Llama-family models on Baton's CPU kernels).
        self.decode_step = CpuDecodeStep.of(model)
        # On CUDA, pure decode steps replayed from captured graphs (set by the engine).
        self.graphs: DecodeGraphs | None = None

    def prepare(self, rows: list[BatchRow]) -> tuple[torch.Tensor, torch.Tensor,
                                                     paged_attention.AttentionBatch, list[int]]:
        """Inputs for `rows`: token ids, positions, attention metadata, rows that sample."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        sample_rows: list[int] = []
        trees: list[tuple[int, int, torch.Tensor]] = []
        for i, row in enumerate(rows):
            row_ids, pos, row_slots, tree = _row_tokens(row, bs)
            ids.extend(row_ids)
            slots.extend(row_slots)
            if tree is not None:
                trees.append((i, *tree))
            positions.extend(pos)
            query_lens.append(row.num_tokens)
            context_lens.append(row.start + row.num_tokens)
            sample_rows.extend(range(len(ids) - row.num_logits, len(ids)))
        b = len(rows)
        max_q = max(query_lens)
        max_blocks = max(len(r.block_table) for r in rows)
        tables = torch.zeros(b, max_blocks, dtype=torch.long)
        query_pos = torch.full((b, max_q), -1, dtype=torch.long)
        q_index: list[int] = []
        for i, row in enumerate(rows):
            tables[i, : len(row.block_table)] = torch.tensor(row.block_table)
            query_pos[i, : query_lens[i]] = torch.arange(row.start, context_lens[i])
            q_index.extend(range(i * max_q, i * max_q + query_lens[i]))
        dev = self.device
        batch = paged_attention.AttentionBatch(
            cache=self.cache,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=tables.to(dev),
            query_pos=query_pos.to(dev),
            context_lens=torch.tensor(context_lens, device=dev),
            max_context_len=max(context_lens),
            max_query_len=max_q,
            q_index=None if max_q == 1 else torch.tensor(q_index, device=dev),
            query_start=torch.tensor([0, *itertools.accumulate(query_lens)], device=dev),
            trees=trees,
        )
        input_ids = torch.tensor([ids], device=dev)
        position_ids = torch.tensor([positions], device=dev)
        return input_ids, position_ids, batch, sample_rows

    def run(self, out: SchedulerOutput, on_layer_done: Callable[[int], None] | None = None,
            capture_hidden: bool = False) -> torch.Tensor:
        """Logits `[R, V]` (float32) of a scheduled step, see `scheduled_rows`.

        `on_layer_done(layer)` runs as soon as each layer has written this step's KV.
        """
        return self.run_rows(scheduled_rows(out), on_layer_done, capture_hidden)

    @torch.inference_mode()
    def run_rows(self, rows: list[BatchRow],
                 on_layer_done: Callable[[int], None] | None = None,
                 capture_hidden: bool = False, through_modules: bool = False) -> torch.Tensor:
        """Logits `[R, V]` (float32) for every row's `num_logits` trailing tokens, in order.

        `through_modules` runs transformers' forward even where the lean CPU step would, for
        callers whose hooks must see the layer modules."""
        graphs = self.graphs
        if (graphs is not None and not through_modules and on_layer_done is None
                and graphs.fits(len(rows)) and all(_plain_decode(row) for row in rows)):
            step = graphs.run([row.token_ids[row.start] for row in rows],
                              [row.start for row in rows], [row.block_table for row in rows])
            if step is not None:
                logits, hidden = step
                self.last_hidden = hidden.clone() if capture_hidden else None
                return logits.to(torch.float32, copy=True)  # the graph's buffer is reused
        if (graphs is not None and not through_modules and on_layer_done is None
                and graphs.fits_runs([row.num_tokens for row in rows])
                and any(row.num_logits for row in rows)):
            # Short runs (a verify step's drafts): the same, one graph per run length.
            step = graphs.run_runs([_step_row(row, self.block_size) for row in rows])
            if step is not None:
                logits, hidden = step  # gathered out of the graph's buffers: copies
                self.last_hidden = hidden if capture_hidden else None
                return logits.float()
        input_ids, position_ids, batch, sample_rows = self.prepare(rows)
        batch.on_layer_done = on_layer_done
        keep = torch.tensor(sample_rows or [0], device=self.device)  # none: keep it cheap
        self.last_hidden = None
        if (self.decode_step is not None and not through_modules
                and input_ids.shape[1] <= cpu_step.MAX_TOKENS):
            with paged_attention.attention_batch(batch):
                logits, hidden = self.decode_step.forward(input_ids, position_ids, keep)
            if capture_hidden:
                self.last_hidden = hidden
            return logits[: len(sample_rows)].float()
        hook = None
        if capture_hidden:
            def grab(_module, _inputs, output):
                self.last_hidden = output[0].index_select(0, keep)

            hook = self.model.get_decoder().norm.register_forward_hook(grab)
        try:
            with paged_attention.attention_batch(batch):
                logits = self.model(
                    input_ids=input_ids, position_ids=position_ids, use_cache=False,
                    logits_to_keep=keep,
                ).logits
        finally:
            if hook is not None:
                hook.remove()
        return logits[0, : len(sample_rows)].float()


def _row_tokens(row: BatchRow, bs: int
                ) -> tuple[list[int], list[int], list[int], tuple[int, torch.Tensor] | None]:
    """A row's token ids, their rotary positions and KV slots, and its draft tree as (query
    index of the tree's root, ancestor mask) when it has one: tree nodes take positions by
    depth, and their slots by order."""
    start, end = row.start, row.start + row.num_tokens
    table = row.block_table
    pos = list(range(start, end))
    slots = [table[p // bs] * bs + p % bs for p in pos]
    tree = None
    if row.tree is not None:
        root = end - len(row.tree) - 1  # the last verified token, the tree's root
        pos[root - start + 1 :] = [root + d for d in row.tree.depths()]
        tree = (root - start, _ancestor_mask(row.tree))
    return row.token_ids[start:end], pos, slots, tree


def _step_row(row: BatchRow, bs: int) -> StepRow:
    """`row` as a run of a captured step: what each token sees of the run is causal, and a
    draft tree's nodes see their ancestors (as `AttentionBatch.tree_mask`)."""
    ids, pos, slots, tree = _row_tokens(row, bs)
    n = len(ids)
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    if tree is not None:
        q0, anc = tree
        mask[q0 : q0 + anc.shape[0], q0 : q0 + anc.shape[0]] = anc
    return StepRow(ids, pos, slots, row.start + n, row.block_table, mask, row.num_logits)


def _plain_decode(row: BatchRow) -> bool:
    """One new token that samples, no draft: what a captured decode step runs."""
    return row.num_tokens == 1 and row.num_logits == 1 and row.tree is None


def _ancestor_mask(tree: DraftTree) -> torch.Tensor:
    """`[n+1, n+1]` bool: query row r (0 = the root) may see key column c (self and ancestors)."""
    n = len(tree)
    m = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    m[:, 0] = True
    for i, p in enumerate(tree.parents):
        if p >= 0:
            m[i + 1] = m[p + 1]
        m[i + 1, i + 1] = True
    return m
