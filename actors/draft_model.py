"""Draft-model speculation: a small model proposes a chain of tokens, one forward per token, for
all drafting requests at once.

`draft` is a separate model with the target's tokenizer and its own paged KV, addressed through
the target's block tables (the same block ids, so no second block manager). `layerskip` is the
target's own first L layers under its final norm and LM head (self-speculation): it reads and
writes the target's cache for those layers, where the verified tokens' KV already is.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from baton.actors.draft_tree import DraftTree
from baton.actors.kv_cache import KVCacheSpec, PagedKVCache
from baton.actors.model_runner import BatchRow, ModelRunner
from baton.actors.sampler import target_probs
from baton.actors.sequence import Sequence
from baton.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(slots=True)
class DraftRequest:
    """One request to draft for: `k` tokens, sampled from its generator unless greedy."""

    seq: Sequence
    k: int
    generator: torch.Generator | None


class DraftModelProposer:
    """Drafts chains with `model`; `shares_target_kv` for layer-skip (KV of verified tokens is
    the target's own), else `cache` is the draft's own."""

    def __init__(self, model, cache: PagedKVCache, device: torch.device,
                 shares_target_kv: bool):
        self.runner = ModelRunner(model, cache, device)
        self.shares_target_kv = shares_target_kv

    def propose(self, requests: list[DraftRequest]) -> None:
        """Attach a chain of up to `k` tokens to each request's sequence."""
        active = [r for r in requests if r.k > 0]
        if not active:
            return
        drafted: dict[int, list[int]] = {id(r): [] for r in active}
        dists: dict[int, list[torch.Tensor]] = {id(r): [] for r in active}
        base = {id(r): len(r.seq.token_ids) for r in active}
        for depth in range(max(r.k for r in active)):
            rows, step = [], [r for r in active if r.k > depth]
            for r in step:
                seq = r.seq
                start = self._kv_len(seq) if depth == 0 else len(seq.token_ids) - 1
                rows.append(BatchRow(seq.token_ids, start, len(seq.token_ids) - start,
                                     seq.block_table, 1))
            logits = self.runner.run_rows(rows)
            for r, row_logits in zip(step, logits, strict=True):
                params = r.seq.params
                if params.greedy:
                    token = int(row_logits.argmax())
                else:
                    q = target_probs(row_logits.unsqueeze(0), [params])[0]
                    token = int(torch.multinomial(q, 1, generator=r.generator))
                    dists[id(r)].append(q)
                drafted[id(r)].append(token)
                r.seq.token_ids.append(token)
        for r in active:
            seq = r.seq
            del seq.token_ids[base[id(r)] :]
            tokens = drafted[id(r)]
            probs = torch.stack(dists[id(r)]) if dists[id(r)] else None
            # KV now holds every position but the last drafted token's.
            seq.draft_kv_len = len(seq.token_ids) + len(tokens) - 1
            seq.attach_draft(DraftTree.chain(tokens, probs))

    def _kv_len(self, seq: Sequence) -> int:
        """Positions whose draft KV is valid (the first position the draft must compute)."""
        if self.shares_target_kv:
            return seq.num_computed_tokens
        return min(seq.draft_kv_len, len(seq.token_ids) - 1)


def separate_draft(model, target_vocab: int, num_blocks: int, block_size: int,
                   dtype: torch.dtype, device: torch.device) -> DraftModelProposer:
    """A proposer over a separately loaded draft `model`, with a paged cache as large as the
    target's (in blocks) so both follow the same block tables."""
    vocab = model.config.get_text_config().vocab_size
    if vocab != target_vocab:
        raise ConfigError(
            f"draft model vocabulary ({vocab}) differs from the target's ({target_vocab}); "
            "a draft model must share the target's tokenizer"
        )
    spec = KVCacheSpec.from_model_config(model.config, block_size, dtype)
    return DraftModelProposer(model, PagedKVCache(spec, num_blocks, device), device, False)


def layerskip_draft(model, cache: PagedKVCache, device: torch.device,
                    num_layers: int) -> DraftModelProposer:
    """A proposer that runs the target's first `num_layers` decoder layers, then its final norm
    and LM head."""
    return DraftModelProposer(truncated(model, num_layers), cache, device, True)


def decoder_layers(model) -> nn.ModuleList:
    """The decoder layer list of a transformers causal LM."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ConfigError(f"cannot find the decoder layers of {type(model).__name__} for layerskip")


def truncated(model, num_layers: int):
    """A view of `model` running only its first `num_layers` layers (weights shared, not copied)."""
    layers = decoder_layers(model)
    if not 1 <= num_layers < len(layers):
        raise ConfigError(
            f"layerskip needs 1 <= layers < {len(layers)} (the model's depth), got {num_layers}"
        )
    base = model.get_decoder()
    short_base = _shallow(base)
    for name in ("layers", "h", "blocks"):
        if getattr(base, name, None) is layers:
            short_base._modules[name] = nn.ModuleList(list(layers)[:num_layers])
    short_base.config = copy.copy(base.config)
    short_base.config.num_hidden_layers = num_layers
    short = _shallow(model)
    for name, child in model._modules.items():
        if child is base:
            short._modules[name] = short_base
    return short


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object sharing `module`'s parameters and children, whose child table can be
    edited without touching the original."""
    out = copy.copy(module)
    out._modules = dict(module._modules)
    out._parameters = dict(module._parameters)
    out._buffers = dict(module._buffers)
    return out
