"""`baton train-experts`' work: record a MoE model's routing over text, fit and score its
routing-path predictor, save it.

The model answers the prompts `baton train-heads` uses (questions, stories, code, passages,
edits, arithmetic, raw text); every token it reads or writes gives one example: its MoE input at
every MoE layer but the last, and every later MoE layer's router logits and top-k experts for it.
Prompts are split into training and held-out ones before anything runs, so the scores are on text
the fit never saw.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from baton.actors.engine import Engine
from baton.actors.moe_offload import moe_layers, router_scores
from baton.actors.routing_predictor import (
    LayerScore,
    ModelShape,
    RoutingPredictor,
    popular_experts,
)
from baton.errors import ConfigError
from baton.ops.heads_prompts import build_prompts
from baton.sampling import SamplingParams

log = logging.getLogger(__name__)

HELDOUT_EVERY = 5  # every 5th prompt (after a seeded shuffle) is held out
BATCH = 8  # prompts run together


@dataclass(slots=True)
class Routes:
    """Recorded examples, per token and later MoE layer: `inputs [N, targets, H]` (the MoE input
    of the layer before), `logits [N, targets, E]` and `chosen [N, targets, k]` (the layer's
    router logits and top-k experts)."""

    inputs: torch.Tensor
    logits: torch.Tensor
    chosen: torch.Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]


@dataclass(slots=True)
class TrainReport:
    """What `train_experts` did: examples per split, per-layer held-out scores, seconds."""

    model: str
    out: str
    shape: ModelShape
    tokens: dict[str, int]
    layers: list[LayerScore]
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"model": self.model, "out": self.out, "shape": asdict(self.shape),
                "tokens": self.tokens, "layers": [asdict(s) for s in self.layers],
                "seconds": self.seconds}


def model_shape(engine: Engine) -> ModelShape:
    """The MoE shape of `engine`'s model; `ConfigError` for a dense model."""
    layers = moe_layers(engine.model)
    if len(layers) < 2:
        raise ConfigError(f"--model {engine.source.name} has {len(layers)} Mixture-of-Experts "
                          "layers; a routing-path predictor needs at least two")
    experts = layers[0].experts
    text = engine.model.config.get_text_config()
    top_k = int(getattr(text, "num_experts_per_tok", None) or getattr(text, "top_k", 1))
    return ModelShape(tuple(layer.index for layer in layers), int(experts.num_experts), top_k,
                      int(experts.gate_up_proj.shape[-1]))


def record_routes(engine: Engine, prompts: list[str], max_tokens: int, want: int,
                  on_tokens: Callable[[int], None] = lambda n: None) -> Routes:
    """Run `prompts` (in batches) until `want` tokens went through the model, keeping what
    `Routes` holds (the first `want` tokens are returned)."""
    layers = moe_layers(engine.model)
    scorers = [router_scores(layer.router, float32=True) for layer in layers]
    if any(scores is None for scores in scorers):
        raise ConfigError(f"--model {engine.source.name}: a MoE layer's router has no weight to "
                          "record its logits with")
    inputs: list[list[torch.Tensor]] = [[] for _ in layers[:-1]]
    logits: list[list[torch.Tensor]] = [[] for _ in layers[1:]]
    chosen: list[list[torch.Tensor]] = [[] for _ in layers[1:]]

    def keep(position: int):
        scores = scorers[position]
        assert scores is not None

        def hook(_module, args) -> None:
            hidden = args[0].detach()
            if position < len(layers) - 1:
                inputs[position].append(hidden.float().cpu())
            if position > 0:
                logits[position - 1].append(scores(hidden).detach().cpu())
                chosen[position - 1].append(args[1].detach().cpu())
        return hook

    handles = [layer.experts.register_forward_pre_hook(keep(i)) for i, layer in enumerate(layers)]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    try:
        for first in range(0, len(prompts), BATCH):
            engine.generate(list(prompts[first : first + BATCH]), params)
            seen = sum(len(h) for h in inputs[0])
            on_tokens(seen)
            if seen >= want:
                break
    finally:
        for handle in handles:
            handle.remove()

    def stacked(per_layer: list[list[torch.Tensor]]) -> torch.Tensor:
        return torch.stack([torch.cat(t)[:want] for t in per_layer], dim=1)

    return Routes(stacked(inputs), stacked(logits), stacked(chosen))


def prompt_texts(engine: Engine, seed: int) -> tuple[list[str], list[str]]:
    """(training, held-out) prompt texts, chat ones through the model's chat template."""
    texts = [engine.apply_chat_template([{"role": "user", "content": p.text}])
             if p.chat and getattr(engine.tokenizer, "chat_template", None) else p.text
             for p in build_prompts()]
    random.Random(seed).shuffle(texts)
    heldout = texts[::HELDOUT_EVERY]
    train = [t for i, t in enumerate(texts) if i % HELDOUT_EVERY]
    return train, heldout


def train_experts(model: str, out: str | Path, tokens: int = 8192, max_tokens: int = 32,
                  seed: int = 0, dtype: str = "bfloat16", device: str = "cpu",
                  threads: int | None = None,
                  on_tokens: Callable[[str, int], None] = lambda split, n: None) -> TrainReport:
    """Record about `tokens` tokens of `model`'s routing (a fifth held out), fit its routing-path
    predictor, score it on the held-out tokens, save it to `out`."""
    if tokens < 2 * HELDOUT_EVERY:
        raise ConfigError(f"--tokens must be at least {2 * HELDOUT_EVERY}, got {tokens}")
    t0 = time.monotonic()
    engine = Engine(model, dtype=dtype, device=device, num_threads=threads, methods=["none"])
    shape = model_shape(engine)
    train_texts, heldout_texts = prompt_texts(engine, seed)
    t1 = time.monotonic()
    heldout_want = tokens // HELDOUT_EVERY
    train = record_routes(engine, train_texts, max_tokens, tokens - heldout_want,
                          lambda n: on_tokens("train", n))
    heldout = record_routes(engine, heldout_texts, max_tokens, heldout_want,
                            lambda n: on_tokens("heldout", n))
    t2 = time.monotonic()
    predictor = RoutingPredictor.fit(shape, train.inputs, train.logits, engine.source.name)
    scores = predictor.evaluate(heldout.inputs, heldout.chosen,
                                popular_experts(train.chosen, shape.num_experts))
    predictor.save(out)
    t3 = time.monotonic()
    log.info("routing predictor for %s saved to %s", engine.source.name, out)
    return TrainReport(engine.source.name, str(out), shape,
                       {"train": len(train), "heldout": len(heldout)}, scores,
                       {"load": t1 - t0, "record": t2 - t1, "fit": t3 - t2})
