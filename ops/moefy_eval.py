"""What moefying cost, on held-out text: perplexity and next-token agreement of the dense and the
moefied model, agreement of their greedy continuations, and the routers' recall.

Definitions (the report's fields):
- `perplexity`: exp of the mean next-token negative log-likelihood over the held-out chunks.
- `top1_agreement`: share of held-out positions where both models' most likely next token is the
  same (both read the same true prefix).
- `greedy_prefix_agreement`: per prompt, the moefied model's greedy continuation's tokens before
  its first difference from the dense one's, over the tokens generated; averaged over prompts.
- `greedy_position_agreement`: per prompt, share of positions holding the same token in both
  continuations (after a difference the two texts drift, so this is the looser figure).
- `router_recall`: per layer, the share of the groups' true contribution mass (each group's output
  norm, summed over tokens) that falls in the router's top-k, given the dense model's MLP input
  (with a pre-gate: the first layer's);
  `oracle_recall` is the same for the true top-k, `random_recall` is k/E.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from baton.ops import moefy_text
from baton.ops.moefy import LayerTrace, Split, group_scores


@dataclass(slots=True)
class ModelScore:
    """One model's held-out next-token losses and top-1 predictions."""

    nll: float
    tokens: int
    top1: torch.Tensor

    @property
    def perplexity(self) -> float:
        return float(torch.exp(torch.tensor(self.nll / self.tokens)))


@torch.inference_mode()
def score(model, chunks: list[torch.Tensor]) -> ModelScore:
    """Summed next-token NLL and the argmax predictions of `model` over `chunks`."""
    nll = 0.0
    tokens = 0
    top1 = []
    for chunk in chunks:
        logits = model(chunk[None]).logits[0, :-1].float()
        target = chunk[1:]
        nll += F.cross_entropy(logits, target, reduction="sum").item()
        tokens += len(target)
        top1.append(logits.argmax(-1))
    return ModelScore(nll, tokens, torch.cat(top1))


@torch.inference_mode()
def greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of each prompt (no stop at end-of-sequence, so lengths match)."""
    outs = []
    for ids in prompts:
        prompt = torch.tensor([ids])
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             pad_token_id=model.config.eos_token_id)
        outs.append(out[0, len(ids):].tolist())
    return outs


def greedy_prompts(tokenizer) -> list[list[int]]:
    """The plain and chat prompts of `moefy_text`, tokenized."""
    texts = list(moefy_text.GREEDY_PROMPTS) + [
        tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
        for c in moefy_text.GREEDY_CHATS]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def agreement(want: list[list[int]], got: list[list[int]]) -> tuple[float, float]:
    """(prefix agreement, position agreement) of `got` against `want`, averaged over prompts."""
    prefix = []
    position = []
    for a, b in zip(want, got, strict=True):
        same = [x == y for x, y in zip(a, b, strict=True)]
        prefix.append((same + [False]).index(False) / len(a))
        position.append(sum(same) / len(a))
    return sum(prefix) / len(prefix), sum(position) / len(position)


def router_recall(model, traces: list[LayerTrace], split: Split,
                  top_k: int) -> tuple[list[float], list[float]]:
    """Per layer, the router's and the oracle's share of the true group mass (see module doc).
    With a pre-gate, the router of layer i is the pre-gate's row i on the first layer's input."""
    routed, oracle = [], []
    for i, (trace, groups, router) in enumerate(
            zip(traces, split.groups, split.routers, strict=True)):
        down = model.model.layers[i].mlp.down_proj.weight.detach().float()
        mass = group_scores(trace.act, down, groups)  # [T, E]
        if split.pregate is not None:
            chosen = (traces[0].x @ split.pregate[i].T).topk(top_k, dim=1).indices
        else:
            chosen = (trace.x @ router.T).topk(top_k, dim=1).indices
        total = mass.sum()
        routed.append((mass.gather(1, chosen).sum() / total).item())
        oracle.append((mass.topk(top_k, dim=1).values.sum() / total).item())
    return routed, oracle


@dataclass(slots=True)
class MoefyReport:
    """What `baton moefy` made and what it costs against the dense model on held-out text."""

    model: str
    out_dir: str
    experts: int
    top_k: int
    pregate: bool  # routed by one router for all layers (Read-ME) rather than one per layer
    expert_size: int
    calibration_tokens: int
    heldout_tokens: int
    dense_perplexity: float
    moe_perplexity: float
    top1_agreement: float
    greedy_prompts: int
    greedy_tokens: int
    greedy_prefix_agreement: float
    greedy_position_agreement: float
    router_recall: float
    oracle_recall: float
    random_recall: float
    router_recall_per_layer: list[float]
    seconds: dict[str, float]

    def as_dict(self) -> dict:
        return asdict(self)
