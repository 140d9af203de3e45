"""The self-distillation corpus for Medusa heads: text the model itself writes, with the hidden
state behind every token.

The model answers the prompt set greedily (transformers `generate`, batched, left-padded). A hook
on its LM head keeps the LM head's input at the last position of every forward pass: the
post-final-norm hidden state that produced each generated token, which is exactly what the heads
see in the engine. Generation stops at a deadline, mid-batch if need be, so it is bounded in time.
"""

from __future__ import annotations

import random
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
from baton.errors import ConfigError
from baton.ops.heads_prompts import HeadsPrompt
from baton.prompts import chat_prompt, encode_prompt

TOP_K = 4  # the model's likeliest tokens kept per position: the negatives that matter
HELDOUT_EVERY = 8  # every 8th prompt is held out for evaluation
SAMPLE_TEMPERATURE = 0.8  # passes after the first (greedy) one sample, for more varied text


@dataclass(slots=True)
class Answer:
    """One generated answer: `hidden[j]` is the LM head's input that gave `tokens[j]`."""

    hidden: torch.Tensor  # [L, H] float32
    tokens: torch.Tensor  # [L] long: what was emitted (sampled, or greedy)
    top: torch.Tensor  # [L, TOP_K] long: the model's likeliest tokens there, best first

    def __len__(self) -> int:
        return int(self.tokens.numel())


@dataclass(slots=True)
class Corpus:
    """Answers laid end to end; `greedy[n]` is the model's own choice after `hidden[n]`."""

    hidden: torch.Tensor  # [N, H] float32
    top: torch.Tensor  # [N, TOP_K] long
    tokens: torch.Tensor  # [N] long: the token `hidden[n]` gave (what the answer says)
    ends: torch.Tensor  # [N] long: index just past the end of n's answer
    num_sequences: int

    def __len__(self) -> int:
        return int(self.top.shape[0])

    @property
    def greedy(self) -> torch.Tensor:
        return self.top[:, 0]

    def targets(self, num_heads: int) -> torch.Tensor:
        """[N, K]: head i's target at n, the model's own choice i + 1 positions after the token
        `hidden[n]` gave; -1 past the end of the answer."""
        return self._ahead(self.greedy, 1, num_heads)

    def prev_tokens(self, num_heads: int) -> torch.Tensor:
        """[N, K]: what token-conditioned head i sees at n, the answer's token just before its
        target (`tokens[n + i]`); -1 past the end of the answer."""
        return self._ahead(self.tokens, 0, num_heads)

    def _ahead(self, values: torch.Tensor, first: int, num_heads: int) -> torch.Tensor:
        """[N, K]: `values[n + first + i]` in column i, -1 where that is past n's answer."""
        n = torch.arange(len(self))
        out = torch.full((len(self), num_heads), -1, dtype=torch.long)
        for i in range(num_heads):
            at = n + first + i
            ok = at < self.ends
            out[ok, i] = values[at[ok]]
        return out

    @classmethod
    def join(cls, answers: Sequence[Answer], hidden_size: int) -> Corpus:
        if not answers:
            empty = torch.zeros(0, dtype=torch.long)
            return cls(torch.zeros(0, hidden_size), torch.zeros(0, TOP_K, dtype=torch.long),
                       empty, empty, 0)
        lengths = torch.tensor([len(a) for a in answers])
        ends = torch.repeat_interleave(torch.cumsum(lengths, 0), lengths)
        return cls(torch.cat([a.hidden for a in answers]), torch.cat([a.top for a in answers]),
                   torch.cat([a.tokens for a in answers]), ends, len(answers))


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
def generate_answers(model: PreTrainedModel, tokenizer, prompts: Sequence[list[int]], *,
                     max_new_tokens: int, batch_size: int, deadline: float,
                     temperature: float = 0.0, on_step: Callable[[int], None] | None = None,
                     ) -> list[Answer]:
    """The model's answer to each prompt it reaches before `deadline` (greedy at temperature 0).

    An answer ends at its first end-of-sequence token (kept: the heads learn to predict it), at
    `max_new_tokens`, or where the deadline cut it. `on_step(n)` is called once per decoding
    step with the batch's size. Seed torch beforehand for reproducible sampling.
    """
    device, _ = placement(model)
    stops = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops, default=0)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                              temperature=temperature or None, pad_token_id=pad,
                              eos_token_id=sorted(stops) or None)
    criteria = StoppingCriteriaList([_Deadline(deadline, on_step or (lambda n: None))])
    hidden_steps: list[torch.Tensor] = []
    top_steps: list[torch.Tensor] = []

    def keep_last(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor):
        hidden_steps.append(inputs[0][:, -1, :].float().cpu())
        top_steps.append(output[:, -1, :].topk(TOP_K, dim=-1).indices.cpu())

    hook = model.get_output_embeddings().register_forward_hook(keep_last)
    out: list[Answer] = []
    try:
        for start in range(0, len(prompts), batch_size):
            if time.monotonic() >= deadline:
                break
            batch = prompts[start : start + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch],
                                device=device)
            hidden_steps.clear()
            top_steps.clear()
            gen = cast(GenerationMixin, model).generate(
                input_ids=ids, attention_mask=mask, generation_config=config,
                stopping_criteria=criteria)[:, width:].cpu()
            hidden = torch.stack(hidden_steps[: gen.shape[1]], dim=1)  # [B, S, H]
            top = torch.stack(top_steps[: gen.shape[1]], dim=1)  # [B, S, TOP_K]
            for row in range(len(batch)):
                toks = gen[row].tolist()
                length = next((j + 1 for j, t in enumerate(toks) if t in stops), len(toks))
                out.append(Answer(hidden[row, :length], gen[row, :length], top[row, :length]))
    finally:
        hook.remove()
    return out


@dataclass(slots=True)
class Answers:
    """The corpus `baton train-heads` gathers: answers to training and to held-out prompts."""

    train: list[Answer]
    heldout: list[Answer]
    passes: int  # 1: every prompt reached once, greedily; more: sampled passes followed


def answer_prompts(model: PreTrainedModel, tokenizer, model_name: str,
                   prompts: Sequence[HeadsPrompt], *, seed: int, deadline: float,
                   max_new_tokens: int, batch_size: int,
                   on_step: Callable[[int], None] | None = None) -> Answers:
    """The model's answers until `deadline`: every prompt greedily first, then sampled passes
    (temperature SAMPLE_TEMPERATURE, new order each pass) while time is left.

    Every HELDOUT_EVERY-th prompt (of a seeded shuffle) is held out with all of its answers, so
    evaluation runs on prompts training never saw.
    """
    vocab = int(model.config.get_text_config().vocab_size)
    order = list(prompts)
    random.Random(seed).shuffle(order)
    ids = [encode(tokenizer, model_name, vocab, p) for p in order]
    if not ids:
        raise ConfigError("no prompts to answer")
    held = {i for i in range(len(ids)) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1}
    out = Answers([], [], 0)
    while time.monotonic() < deadline:
        pass_order = list(range(len(ids)))
        if out.passes:
            random.Random(seed + out.passes).shuffle(pass_order)
        torch.manual_seed(seed + out.passes)
        answers = generate_answers(
            model, tokenizer, [ids[i] for i in pass_order], max_new_tokens=max_new_tokens,
            batch_size=batch_size, deadline=deadline,
            temperature=SAMPLE_TEMPERATURE if out.passes else 0.0, on_step=on_step)
        for i, answer in zip(pass_order, answers, strict=False):
            (out.heldout if i in held else out.train).append(answer)
        out.passes += 1
    return out
