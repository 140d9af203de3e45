"""Loads the model and runs one scheduled step on the paged KV cache."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from baton.actors import paged_attention
from baton.actors.cpu_linear import pack_linears, packing_supported
from baton.actors.kv_cache import PagedKVCache
from baton.actors.model_source import ModelSource
from baton.actors.moe_experts import use_grouped_experts
from baton.actors.quantized_linear import quantize_linears
from baton.actors.scheduler import SchedulerOutput
from baton.errors import ModelLoadError, ModelNotFoundError

log = logging.getLogger(__name__)


def load_model(source: ModelSource, dtype: torch.dtype, device: torch.device,
               quantization: str | None = None, group_size: int = 128):
    """(model, tokenizer) for a resolved source, with Baton's paged attention plugged in.

    `quantization` ("int8" or "int4" in groups of `group_size`) makes the linears weight-only
    quantized.
    """
    quant = (quantization, group_size)
    attn = paged_attention.ATTN_IMPLEMENTATION
    if source.kind == "tiny":
        from baton.actors.tiny import tiny_model, tiny_tokenizer

        arch = source.spec.split(":", 1)[1]
        model = tiny_model(arch, dtype, attn).to(device)
        return prepare_for_inference(model, dtype, device, *quant), tiny_tokenizer()
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
    return prepare_for_inference(model.to(device).eval(), dtype, device, *quant), tokenizer


def prepare_for_inference(model, dtype: torch.dtype, device: torch.device,
                          quantization: str | None = None, group_size: int = 128):
    """Check the model fits Baton's attention, then apply run-time conversions: MoE layers on
    Baton's grouped GEMM (CUDA), weight-only quantization if asked for, then packed CPU linears
    (which keep results bit for bit)."""
    text = model.config.get_text_config()
    if getattr(text, "attn_logit_softcapping", None):
        raise ModelLoadError(
            f"{type(model).__name__} caps attention logits (attn_logit_softcapping), which "
            "Baton's paged attention does not support yet; choose another model"
        )
    use_grouped_experts(model, device)
    if quantization:
        quantize_linears(model, quantization, group_size)
    if packing_supported(dtype, device):
        pack_linears(model)
    return model


class ModelRunner:
    """Turns a `SchedulerOutput` into one packed forward pass and the logits to sample from."""

    def __init__(self, model, cache: PagedKVCache, device: torch.device):
        self.model = model
        self.cache = cache
        self.device = device
        self.block_size = cache.spec.block_size

    def prepare(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor,
                                                      paged_attention.AttentionBatch, list[int]]:
        """Inputs for `out`: token ids, positions, attention metadata, rows that sample."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        sample_rows: list[int] = []
        for seq in out.seqs:
            n = out.num_scheduled_tokens[seq.request_id]
            start = seq.num_computed_tokens
            end = start + n
            table = seq.block_table
            ids.extend(seq.token_ids[start:end])
            pos = range(start, end)
            positions.extend(pos)
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            query_lens.append(n)
            context_lens.append(end)
            if end == len(seq):
                sample_rows.append(len(ids) - 1)
        b = len(out.seqs)
        max_q = max(query_lens)
        max_blocks = max(len(s.block_table) for s in out.seqs)
        tables = torch.zeros(b, max_blocks, dtype=torch.long)
        query_pos = torch.full((b, max_q), -1, dtype=torch.long)
        q_index: list[int] = []
        for i, seq in enumerate(out.seqs):
            tables[i, : len(seq.block_table)] = torch.tensor(seq.block_table)
            start = context_lens[i] - query_lens[i]
            query_pos[i, : query_lens[i]] = torch.arange(start, context_lens[i])
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
        )
        input_ids = torch.tensor([ids], device=dev)
        position_ids = torch.tensor([positions], device=dev)
        return input_ids, position_ids, batch, sample_rows

    @torch.inference_mode()
    def run(self, out: SchedulerOutput,
            on_layer_done: Callable[[int], None] | None = None) -> torch.Tensor:
        """Logits `[R, V]` (float32) for the requests whose last scheduled token is their last.

        `on_layer_done(layer)` runs as soon as each layer has written this step's KV.
        """
        input_ids, position_ids, batch, rows = self.prepare(out)
        batch.on_layer_done = on_layer_done
        if not rows:
            keep = torch.tensor([0], device=self.device)  # nothing to sample: keep it cheap
        else:
            keep = torch.tensor(rows, device=self.device)
        with paged_attention.attention_batch(batch):
            logits = self.model(
                input_ids=input_ids, position_ids=position_ids, use_cache=False,
                logits_to_keep=keep,
            ).logits
        return logits[0, : len(rows)].float()
