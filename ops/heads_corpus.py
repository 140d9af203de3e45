"""The self-distillation corpus for Medusa heads: text the model itself writes, with the hidden
state behind every token.

The model answers the prompt set greedily (transformers `generate`, batched, left-padded). A hook
on its LM head keeps the LM head's input at the last position of every forward pass: the
post-final-norm hidden state that produced each generated token, which is exactly what the heads
see in the engine. Generation stops at a deadline, mid-batch if need be, so it is bounded in time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from transformers import (
    GenerationConfig,
    GenerationMixin,
    PreTrainedModel,
    StoppingCriteria,
    StoppingCriteriaList,
)

from baton.actors.medusa import placement
from baton.ops.heads_prompts import HeadsPrompt
from baton.prompts import chat_prompt, encode_prompt


@dataclass(slots=True)
class Corpus:
    """Generated sequences laid end to end: `hidden[n]` produced `tokens[n]` (greedy)."""

    hidden: torch.Tensor  # [N, H] float32
    tokens: torch.Tensor  # [N] long
    ends: torch.Tensor  # [N] long: index just past the end of n's sequence
    num_sequences: int

    def __len__(self) -> int:
        return int(self.tokens.numel())

    def targets(self, num_heads: int) -> torch.Tensor:
        """[N, K]: head i's target at n, the model's own token i + 1 after `tokens[n]`; -1 past
        the end of the sequence."""
        n = torch.arange(len(self))
        out = torch.full((len(self), num_heads), -1, dtype=torch.long)
        for i in range(num_heads):
            at = n + 1 + i
            ok = at < self.ends
            out[ok, i] = self.tokens[at[ok]]
        return out

    @classmethod
    def join(cls, seqs: Sequence[tuple[torch.Tensor, torch.Tensor]], hidden_size: int) -> Corpus:
        """A corpus from (hidden [L, H], tokens [L]) pairs."""
        if not seqs:
            return cls(torch.zeros(0, hidden_size), torch.zeros(0, dtype=torch.long),
                       torch.zeros(0, dtype=torch.long), 0)
        lengths = torch.tensor([len(t) for _, t in seqs])
        ends = torch.repeat_interleave(torch.cumsum(lengths, 0), lengths)
        return cls(torch.cat([h for h, _ in seqs]), torch.cat([t for _, t in seqs]), ends,
                   len(seqs))


class _Deadline(StoppingCriteria):
    """Stops generation at `deadline` (time.monotonic); reports each decoding step."""

    def __init__(self, deadline: float, on_step: Callable[[int], None]):
        self.deadline = deadline
        self.on_step = on_step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.on_step(input_ids.shape[0])
        stop = time.monotonic() >= self.deadline
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def encode(tokenizer, model_name: str, vocab_size: int, prompt: HeadsPrompt) -> list[int]:
    """Token ids the way Baton's engine encodes the same request (chat template or raw text)."""
    text = prompt.text
    if prompt.chat and getattr(tokenizer, "chat_template", None):
        text = chat_prompt(tokenizer, model_name, [{"role": "user", "content": text}])
    return encode_prompt(tokenizer, vocab_size, text)


def eos_ids(model: PreTrainedModel, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


@torch.inference_mode()
def generate_sequences(model: PreTrainedModel, tokenizer, prompts: Sequence[list[int]], *,
                       max_new_tokens: int, batch_size: int, deadline: float,
                       on_step: Callable[[int], None] | None = None,
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(hidden [L, H] float32, tokens [L]) for each prompt answered before `deadline`.

    A sequence ends at its first end-of-sequence token (kept: the heads learn to predict it).
    `on_step(n)` is called once per decoding step with the batch's size.
    """
    device, _ = placement(model)
    stops = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops, default=0)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                              eos_token_id=sorted(stops) or None)
    criteria = StoppingCriteriaList([_Deadline(deadline, on_step or (lambda n: None))])
    captured: list[torch.Tensor] = []

    def keep_last(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor):
        captured.append(inputs[0][:, -1, :].float().cpu())

    hook = model.get_output_embeddings().register_forward_hook(keep_last)
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            if time.monotonic() >= deadline:
                break
            batch = prompts[start : start + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch],
                                device=device)
            captured.clear()
            gen = cast(GenerationMixin, model).generate(
                input_ids=ids, attention_mask=mask, generation_config=config,
                stopping_criteria=criteria)[:, width:].cpu()
            hidden = torch.stack(captured[: gen.shape[1]], dim=1)  # [B, S, H]
            for row in range(len(batch)):
                toks = gen[row].tolist()
                length = next((j + 1 for j, t in enumerate(toks) if t in stops), len(toks))
                out.append((hidden[row, :length], gen[row, :length]))
    finally:
        hook.remove()
    return out
