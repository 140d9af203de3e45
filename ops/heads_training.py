"""Training Medusa heads by self-distillation, inside a fixed time budget.

1. The model answers Baton's prompt set (`heads_corpus`), greedily and then, while time is left,
   sampled, keeping the hidden state behind every token and its own likeliest tokens there:
   generation gets `data_fraction` of the budget. It runs in the dtype an engine on this device
   would serve in (`dtype="auto"`): the hidden states are then the ones the heads see when
   serving, and on a CPU with bf16 units the answers come about twice as fast as in float32
   (283 against 130 tokens/s, batch 32, default model, 2 cores): a 15-minute run trains on 55k
   positions instead of 29k. Head 0's held-out agreement stayed at 0.38 with the larger corpus;
   served on the chat, story and arithmetic requests of `bench spec`, the new heads drafted
   1.52-1.55 tokens a pass against 1.49-1.52 (two alternated runs).
2. The heads (backbone and LM head frozen) learn to predict the model's own token i + 1 ahead of
   the next one (its greedy choice there), from cached hidden states (token-conditioned heads
   also from the answer's token before their target), until the budget's
   training share runs out. The softmax runs over the tokens the model ranks among its top
   TOP_K anywhere in the training text (a few thousand of a 49k vocabulary): the LM head product
   over the full vocabulary is nearly all the cost, and the heads only need to rank what the
   model itself would write. Serving drafts among fewer: the tokens that were the model's own
   first choice somewhere in the training text (`draft_vocab`), about a third as many, since
   each drafted depth reads those rows of the LM head again.
3. Held-out sequences (whole answers the heads never saw) measure each head's top-1 agreement with
   the model, drafting as serving does, against untrained heads (the LM head itself).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from transformers import PreTrainedModel

from baton.actors import dtype_choice
from baton.actors.medusa import MedusaHeads, linear_params
from baton.actors.medusa_trees import draft_trees
from baton.actors.model_runner import load_model
from baton.actors.model_source import ModelSource, resolve
from baton.errors import ConfigError
from baton.ops.heads_corpus import Corpus, answer_prompts
from baton.ops.heads_prompts import HeadsPrompt, build_prompts

MAX_EVAL_POSITIONS = 1024
WARMUP_STEPS = 20
FULL_VOCAB_SHARE = 0.5  # train over the full vocabulary when the text uses more than this share


@dataclass(slots=True)
class HeadsReport:
    """What a training run did and how well the heads agree with the model on held-out text."""

    model: str
    out_dir: str
    num_heads: int
    sequences: dict[str, int] = field(default_factory=dict)  # train / heldout answers
    positions: dict[str, int] = field(default_factory=dict)  # train / heldout / evaluated
    passes: int = 0  # over the prompt set: the first greedy, later ones sampled
    generate_dtype: str = ""  # the dtype the answers were written in
    steps: int = 0
    softmax_tokens: int = 0
    draft_tokens: int = 0  # the tokens serving drafts among
    agreement: list[float] = field(default_factory=list)  # trained heads, top-1, held-out
    untrained: list[float] = field(default_factory=list)  # fresh heads (the LM head itself)
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class Progress:
    """Callbacks the command line turns into progress bars; all optional."""

    on_generate: Callable[[int, float], None] = lambda tokens, frac: None
    on_train: Callable[[int, float, float], None] = lambda step, frac, loss: None


def train_heads(model_spec: str = "default", out_dir: str | Path = "medusa-heads",
                minutes: float = 15.0, num_heads: int = 4, seed: int = 0, device: str = "cpu",
                threads: int | None = None, *, max_steps: int | None = None,
                data_fraction: float = 0.6, conditioned: bool = True,
                max_new_tokens: int = 160, batch_size: int = 32, batch_positions: int = 256,
                lr: float = 1e-3, prompts: list[HeadsPrompt] | None = None,
                progress: Progress | None = None) -> HeadsReport:
    """Generate the corpus, train `num_heads` heads, evaluate them and save them to `out_dir`.

    The whole run (loading aside) fits `minutes`; `max_steps` stops training earlier (tests).
    `threads` sets torch's CPU threads (fewer than the cores can be faster on a shared machine).
    `conditioned`: token-conditioned heads (see `MedusaHeads`), else plain Medusa-1 heads.
    """
    if minutes <= 0 or num_heads < 1 or not 0 < data_fraction < 1:
        raise ConfigError(f"need minutes > 0, heads >= 1 and 0 < data_fraction < 1; got "
                          f"{minutes}, {num_heads}, {data_fraction}")
    progress = progress or Progress()
    clock = time.monotonic()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    source = resolve(model_spec)
    # Trained in float32: exact on every CPU, and faster than unpacked bf16 where the CPU lacks
    # bf16 units.
    model, tokenizer = load_model(source, torch.float32, torch.device(device))
    writer = _writer(model, source, torch.device(device), threads)
    loaded = time.monotonic()
    budget = minutes * 60.0

    data_end = loaded + budget * data_fraction
    made = [0]

    def on_step(batch: int) -> None:
        made[0] += batch
        progress.on_generate(made[0], min(1.0, (time.monotonic() - loaded) / (data_end - loaded)))

    answers = answer_prompts(writer, tokenizer, source.name,
                             prompts if prompts is not None else build_prompts(), seed=seed,
                             deadline=data_end, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, on_step=on_step)
    if not answers.train or not answers.heldout:
        raise ConfigError(f"only {len(answers.train) + len(answers.heldout)} answers were "
                          "generated in the time given; raise --minutes")
    hidden_size = int(model.config.get_text_config().hidden_size)
    train = Corpus.join(answers.train, hidden_size)
    held = Corpus.join(answers.heldout, hidden_size)
    generated = time.monotonic()

    writer_dtype = writer.dtype
    del writer
    heads = MedusaHeads.for_model(model, num_heads, base_model=source.name,
                                  conditioned=conditioned).float()
    train_end = loaded + budget * 0.9
    steps, softmax_vocab = fit(heads, train, train_end, seed=seed, max_steps=max_steps,
                             batch_positions=batch_positions, lr=lr, on_step=progress.on_train)
    heads.vocab = draft_vocab(train, softmax_vocab)
    softmax_tokens = heads.vocab_size if softmax_vocab is None else int(softmax_vocab.numel())
    trained = time.monotonic()

    positions = eval_positions(held, num_heads, seed)
    report = HeadsReport(
        model=source.name, out_dir=str(out_dir), num_heads=num_heads,
        sequences={"train": train.num_sequences, "heldout": held.num_sequences},
        passes=answers.passes, generate_dtype=str(writer_dtype).removeprefix("torch."),
        positions={"train": len(train), "heldout": len(held), "evaluated": len(positions)},
        steps=steps, softmax_tokens=softmax_tokens,
        draft_tokens=heads.vocab_size if heads.vocab is None else int(heads.vocab.numel()),
        agreement=agreement(heads, held, positions),
        untrained=untrained_agreement(held, num_heads, positions),
    )
    report.seconds = {"load": loaded - clock, "generate": generated - loaded,
                      "train": trained - generated, "evaluate": time.monotonic() - trained}
    heads.save(out_dir, extra={"training": report.as_dict()})
    return report


def _writer(model: PreTrainedModel, source: ModelSource, device: torch.device,
            threads: int | None) -> PreTrainedModel:
    """The model that writes the corpus: `model` itself, or a copy in the dtype an engine here
    would serve in where that is not float32."""
    dtype = dtype_choice.resolve(dtype_choice.AUTO, device, threads)
    writer = model if dtype == torch.float32 else load_model(source, dtype, device)[0]
    for m in {id(model): model, id(writer): writer}.values():
        m.set_attn_implementation("sdpa")  # plain transformers generate, no engine step
        m.requires_grad_(False)
    return writer


def fit(heads: MedusaHeads, corpus: Corpus, deadline: float, *, seed: int,
        max_steps: int | None, batch_positions: int, lr: float,
        on_step: Callable[[int, float, float], None]) -> tuple[int, torch.Tensor | None]:
    """Train `heads` in place on `corpus` until `deadline` or `max_steps`; (steps, the tokens
    its softmax ran over: None for the full vocabulary).

    Cross-entropy of each head against the model's own token at its offset, on random positions.
    """
    targets = corpus.targets(heads.num_heads)
    prev = corpus.prev_tokens(heads.num_heads).clamp(min=0)  # wherever a target is, so is prev
    usable = torch.nonzero(targets[:, 0] >= 0).squeeze(1)
    if usable.numel() == 0:
        raise ConfigError("the generated answers are too short to train on; raise --minutes")
    weight, bias = linear_params(heads.lm_head)
    lm_weight, lm_bias = weight.float(), None if bias is None else bias.float()
    subset = torch.unique(corpus.top)
    vocab = subset if subset.numel() <= FULL_VOCAB_SHARE * lm_weight.shape[0] else None
    if vocab is not None:
        # Targets re-indexed into the subset; -1 (past the end) stays -1.
        index = torch.full((lm_weight.shape[0],), -1, dtype=torch.long)
        index[vocab] = torch.arange(vocab.numel())
        targets = torch.where(targets >= 0, index[targets.clamp(min=0)], targets)
        lm_weight = lm_weight[vocab]
        lm_bias = None if lm_bias is None else lm_bias[vocab]
    device = heads.weight.device
    lm_weight, targets, prev = lm_weight.to(device), targets.to(device), prev.to(device)
    lm_bias = None if lm_bias is None else lm_bias.to(device)
    hidden = corpus.hidden.to(device)
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    start = time.monotonic()
    steps, smooth = 0, float("nan")
    heads.train()
    while time.monotonic() < deadline and (max_steps is None or steps < max_steps):
        frac = max((time.monotonic() - start) / max(deadline - start, 1e-9),
                   steps / max_steps if max_steps else 0.0)
        warm = min(1.0, (steps + 1) / WARMUP_STEPS)
        for group in opt.param_groups:
            group["lr"] = lr * warm * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))
        pick = usable[torch.randint(usable.numel(), (batch_positions,), generator=gen)]
        states = heads.head_states(hidden[pick], prev[pick].T if heads.conditioned else None)
        logits = F.linear(states, lm_weight, lm_bias)
        loss = F.cross_entropy(logits.flatten(0, 1), targets[pick].T.reshape(-1), ignore_index=-1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        smooth = loss.item() if math.isnan(smooth) else 0.9 * smooth + 0.1 * loss.item()
        on_step(steps, min(frac, 1.0), smooth)
    heads.eval()
    return steps, vocab


def draft_vocab(corpus: Corpus, softmax_vocab: torch.Tensor | None) -> torch.Tensor | None:
    """The tokens serving drafts among: those the model chose first somewhere in `corpus` (a
    head's draft is the model's first choice or it is rejected). None, the whole vocabulary,
    where training ran over all of it."""
    return None if softmax_vocab is None else torch.unique(corpus.greedy)


def eval_positions(corpus: Corpus, num_heads: int, seed: int) -> torch.Tensor:
    """Up to MAX_EVAL_POSITIONS held-out positions where every head has a target."""
    full = torch.nonzero(corpus.targets(num_heads)[:, -1] >= 0).squeeze(1)
    if full.numel() <= MAX_EVAL_POSITIONS:
        return full
    gen = torch.Generator().manual_seed(seed + 1)
    return full[torch.randperm(full.numel(), generator=gen)[:MAX_EVAL_POSITIONS]].sort().values


@torch.inference_mode()
def agreement(heads: MedusaHeads, corpus: Corpus, positions: torch.Tensor,
              chunk: int = 128) -> list[float]:
    """Per head, the share of `positions` where its top-1 (among the tokens it drafts from) is
    the model's token; a token-conditioned head sees the one head before it drafted (head 0:
    the answer's token at the position)."""
    targets = corpus.targets(heads.num_heads)[positions]
    hits = torch.zeros(heads.num_heads)
    device = heads.weight.device
    for start in range(0, positions.numel(), chunk):
        rows = positions[start : start + chunk]
        hidden = corpus.hidden[rows].to(device, heads.weight.dtype)
        hits += (_top1(heads, hidden, corpus.tokens[rows].to(device)).cpu()
                 == targets[start : start + chunk].T).sum(dim=1)
    return (hits / max(positions.numel(), 1)).tolist()


def _top1(heads: MedusaHeads, hidden: torch.Tensor, roots: torch.Tensor) -> torch.Tensor:
    """[K, n]: each head's best token, drafted as serving drafts: a tree of one candidate per
    node, from each row's root token."""
    chains = draft_trees(heads, hidden, roots.tolist(), heads.num_heads, 1)
    return torch.tensor([tree.tokens for tree, _ in chains], device=hidden.device).T


def untrained_agreement(corpus: Corpus, num_heads: int, positions: torch.Tensor) -> list[float]:
    """Fresh heads are the LM head, whose top-1 at n is the model's own choice `greedy[n]`."""
    targets = corpus.targets(num_heads)[positions]
    same = targets == corpus.greedy[positions].unsqueeze(1)
    return same.float().mean(dim=0).tolist() if positions.numel() else [0.0] * num_heads
