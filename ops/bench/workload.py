"""A deterministic benchmark workload, and what a system's run over it measured.

Every system in a benchmark gets the very same token-id prompts (mixed lengths) and output lengths,
and decodes with EOS ignored, so each one does the same work and token counts compare one to one.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from baton.errors import ConfigError
from baton.stats import percentile

MIN_OUTPUT_TOKENS = 32
MAX_OUTPUT_TOKENS = 256
SYSTEM_PROMPT = "You are a helpful assistant."

QUESTIONS = [
    "What is the capital of France?",
    "Explain how a hash table handles collisions.",
    "Write a haiku about autumn rain.",
    "Why is the sky blue?",
    "Give three tips for writing clear documentation.",
    "How does a bicycle stay upright while moving?",
    "Summarize the plot of a heist movie in two sentences.",
    "What are the main differences between TCP and UDP?",
    "Describe how bread rises.",
    "List some uses of a binary search.",
    "What makes a good unit test?",
    "How do vaccines train the immune system?",
    "Suggest a name for a small coffee shop by the sea.",
    "Why do leaves change color in the fall?",
    "What is the difference between weather and climate?",
    "How would you explain recursion to a child?",
]

PARAGRAPHS = [
    "The lighthouse keeper kept a log of every ship that passed the point. Most entries were "
    "short: a name, a time, the direction of travel and a note on the weather. In the winter "
    "months the entries grew longer, because storms pushed vessels close to the rocks and the "
    "keeper would stay awake through the night to tend the lamp and watch the water.",
    "A city library reorganized its shelves last spring. Fiction moved to the ground floor, "
    "reference works went upstairs next to the reading room, and the children's section gained "
    "a corner with low tables, beanbags and a small stage for weekly story hours. Visitor "
    "numbers rose by a third in the following months, mostly on weekday afternoons.",
    "Engineers testing a new bridge design measured how the deck moved under wind and traffic. "
    "Sensors every ten meters recorded vibration at a hundred samples per second. The data "
    "showed a gentle sway at low frequency, well inside the limits, and a sharper response "
    "when heavy trucks crossed in pairs, which the damping system absorbed within seconds.",
    "The community garden has forty plots, a shared tool shed and a rainwater tank fed by the "
    "roof of the old bus shelter. Members agree on a watering rota in summer and meet once a "
    "month to plan what to plant. Tomatoes, beans and squash are popular, and one plot is kept "
    "for the local school, whose pupils grow herbs and sell them at the autumn fair.",
    "A small software team moved its services from one large server to several containers. "
    "The change took three months. They wrote health checks for every service, added logs "
    "with request identifiers, and set up alerts for error rates and slow responses. The first "
    "week after the move was noisy, but outages became shorter and easier to trace.",
    "Bakers know that dough behaves differently on humid days. Flour absorbs moisture from the "
    "air, so the same recipe can feel sticky in July and stiff in January. Experienced bakers "
    "adjust by feel, holding back some water or adding a spoonful more, and they let the dough "
    "rise by its look rather than by the clock.",
]


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One prompt (token ids) and exactly how many tokens to generate for it."""

    prompt_ids: list[int]
    max_tokens: int


@dataclass(frozen=True, slots=True)
class Workload:
    """The requests of one benchmark, in submission order."""

    requests: list[BenchRequest]
    seed: int

    @property
    def total_output_tokens(self) -> int:
        return sum(r.max_tokens for r in self.requests)

    @property
    def max_output_tokens(self) -> int:
        return max(r.max_tokens for r in self.requests)

    def describe(self) -> dict[str, Any]:
        prompt_lens = [len(r.prompt_ids) for r in self.requests]
        outs = [r.max_tokens for r in self.requests]
        return {
            "num_prompts": len(self.requests),
            "seed": self.seed,
            "prompt_tokens": prompt_lens,
            "output_tokens": outs,
            "total_prompt_tokens": sum(prompt_lens),
            "total_output_tokens": sum(outs),
            "output_tokens_range": [MIN_OUTPUT_TOKENS, MAX_OUTPUT_TOKENS],
            "output_tokens_distribution": "log-uniform over the range",
            "ignore_eos": True,
            "sampling": "greedy",
        }


def build_workload(tokenizer, num_prompts: int, seed: int, max_model_len: int,
                   max_output_tokens: int = MAX_OUTPUT_TOKENS) -> Workload:
    """`num_prompts` chat prompts, half short questions and half a few hundred tokens of context,
    each with an output length drawn log-uniform in [`MIN_OUTPUT_TOKENS`, `max_output_tokens`]
    (capped below `MIN_OUTPUT_TOKENS`, every output is `max_output_tokens` long).

    The same (tokenizer, num_prompts, seed, max_output_tokens) always gives the same token ids.
    """
    if num_prompts < 1:
        raise ConfigError(f"num_prompts must be >= 1, got {num_prompts}")
    if max_output_tokens < 1:
        raise ConfigError(f"max_output_tokens must be >= 1, got {max_output_tokens}")
    rng = random.Random(seed)
    kinds = ["short", "long"] * (num_prompts // 2 + 1)
    kinds = kinds[:num_prompts]
    rng.shuffle(kinds)
    requests = []
    for kind in kinds:
        question = rng.choice(QUESTIONS)
        target = 0 if kind == "short" else rng.randint(150, 450)
        ids = chat_prompt_ids(tokenizer, question, target, rng)
        out = _output_length(rng, max_output_tokens)
        room = max_model_len - out
        requests.append(BenchRequest(ids[-room:], out))
    return Workload(requests, seed)


def _output_length(rng: random.Random, high_tokens: int) -> int:
    # Log-uniform: more short answers than long ones, as in chat traffic; it also keeps the
    # single-stream baselines (the slow part of the run) to about half the whole benchmark.
    low_tokens = min(MIN_OUTPUT_TOKENS, high_tokens)
    low, high = math.log(low_tokens), math.log(high_tokens)
    return min(high_tokens, max(low_tokens, round(math.exp(rng.uniform(low, high)))))


def chat_prompt_ids(tokenizer, question: str, target_tokens: int, rng: random.Random,
                    header: str = "") -> list[int]:
    """Token ids of a chat prompt whose context paragraphs bring it to about `target_tokens`.

    `header` opens the user turn (a distinct one per request keeps prompts from sharing cached
    prefixes past the system prompt).
    """
    order = rng.sample(PARAGRAPHS, len(PARAGRAPHS))
    context: list[str] = []
    ids = _encode(tokenizer, question, context, header)
    i = 0
    while len(ids) < target_tokens:
        context.append(order[i % len(order)])  # repeats paragraphs once the pool runs out
        i += 1
        ids = _encode(tokenizer, question, context, header)
    return ids


def _encode(tokenizer, question: str, context: list[str], header: str = "") -> list[int]:
    content = question
    if context:
        content = "Read these notes, then answer.\n\n" + "\n\n".join(context) + "\n\n" + question
    content = header + content
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": content}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(content, add_special_tokens=True))


@dataclass(slots=True)
class RequestTiming:
    """One request as its client saw it: seconds to the first token, seconds per later token."""

    ttft: float
    tpot: float | None
    tokens: int


@dataclass(slots=True)
class SystemResult:
    """One system's run over the whole workload."""

    timings: list[RequestTiming]
    wall_s: float
    notes: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        ttfts = [t.ttft for t in self.timings]
        tpots = [t.tpot for t in self.timings if t.tpot is not None]
        tokens = sum(t.tokens for t in self.timings)
        return {
            "output_tokens": tokens,
            "output_tok_s": tokens / self.wall_s,
            "ttft_p50_s": percentile(ttfts, 50),
            "ttft_p99_s": percentile(ttfts, 99),
            "tpot_p50_s": percentile(tpots, 50),
            "tpot_p99_s": percentile(tpots, 99),
            "wall_s": self.wall_s,
            "num_requests": len(self.timings),
            **self.notes,
        }

