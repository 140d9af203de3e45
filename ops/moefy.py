"""MoEfication: split a dense model's gated MLPs into experts and write a Mixtral checkpoint.

Each layer's intermediate neurons are clustered by co-activation into equal-size groups (balanced
k-means on their normalized |activation| profiles over calibration tokens); group e becomes
expert e. A ridge-regression router per layer predicts from the MLP input which groups a token
needs; with `pregate`, one more router predicts every layer's groups from the first layer's MLP
input (Read-ME's pre-gating, see `actors/pregate.py`). The dense MLP is the unweighted sum of all
groups while Mixtral weights its top-k experts by renormalized softmax probabilities, so the
router's logits are scaled down until those weights are 1/k to within `ROUTER_MARGIN`, and every
expert's down projection is scaled up by k: the MoE output is then the sum of the chosen groups.
Attention, norms and embeddings are copied as they are, so with top-k equal to the number of
experts the checkpoint computes the dense model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from baton.actors.model_source import TINY_PREFIX, resolve
from baton.actors.pregate import save_pregate
from baton.actors.tiny import tiny_model, tiny_tokenizer
from baton.errors import ConfigError, ModelLoadError
from baton.ops import moefy_text

SUPPORTED_TYPES = ("llama", "mistral")  # attention and norms laid out exactly as Mixtral's
# Router logits are scaled so that none exceeds this in magnitude on calibration tokens: the
# renormalized top-k softmax weights are then 1/k within about twice this, relatively.
ROUTER_MARGIN = 1e-3


@dataclass(frozen=True, slots=True)
class MoefyOptions:
    """How to split the model: `experts` groups per layer, `top_k` of them per token."""

    experts: int = 16
    top_k: int = 4
    chunk_tokens: int = 512  # calibration and evaluation run in packed chunks this long
    max_tokens: int | None = None  # cap on calibration (and held-out) tokens; None: all the text
    kmeans_iters: int = 15
    ridge: float = 1e-2  # relative to the mean diagonal of the router inputs' Gram matrix
    greedy_tokens: int = 32
    seed: int = 0
    pregate: bool = False  # also fit one router for all layers from the first one's input

    def __post_init__(self) -> None:
        if self.experts < 1:
            raise ConfigError(f"--experts must be at least 1, got {self.experts}")
        if not 1 <= self.top_k <= self.experts:
            raise ConfigError(
                f"--top-k must be between 1 and --experts ({self.experts}), got {self.top_k}; "
                "lower --top-k or raise --experts")


@dataclass(slots=True)
class DenseModel:
    """The model being split, in float32, with what its checkpoint is saved as."""

    model: Any
    tokenizer: PreTrainedTokenizerBase
    name: str
    save_dtype: torch.dtype


@dataclass(slots=True)
class LayerTrace:
    """One MLP's input `x [T, H]` and intermediate activation `act [T, I]` over traced tokens."""

    x: torch.Tensor
    act: torch.Tensor


@dataclass(slots=True)
class Split:
    """Per layer: the neurons of each expert `[E, I/E]` and the router weight `[E, H]`; with
    pre-gating, also the one router for all layers `[L, E, H]`."""

    groups: list[torch.Tensor] = field(default_factory=list)
    routers: list[torch.Tensor] = field(default_factory=list)
    pregate: torch.Tensor | None = None


def load_dense(spec: str) -> DenseModel:
    """The dense model `spec` names (tiny specs are built in memory), in float32."""
    source = resolve(spec)
    if source.kind == "tiny":
        arch = spec[len(TINY_PREFIX):]
        return DenseModel(tiny_model(arch), tiny_tokenizer(), source.name, torch.float32)
    hf_logging.disable_progress_bar()
    try:
        saved = AutoConfig.from_pretrained(source.path).dtype  # before loading in float32
        tokenizer = AutoTokenizer.from_pretrained(source.path)
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load {spec!r} as a causal LM: {exc}") from exc
    save_dtype = saved if isinstance(saved, torch.dtype) else torch.float32
    return DenseModel(model.eval(), tokenizer, source.name, save_dtype)


def check_dense(model, options: MoefyOptions) -> None:
    """Raise unless `model` is a dense gated-SiLU Llama-layout model `options` can split."""
    config = model.config
    kind = config.model_type
    if getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None):
        raise ModelLoadError(
            f"the model ({kind}) is already a Mixture-of-Experts; pass a dense model")
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    if not layers or not all(
        hasattr(getattr(layer, "mlp", None), name)
        for layer in layers for name in ("gate_proj", "up_proj", "down_proj")
    ) or config.hidden_act != "silu":
        raise ModelLoadError(
            f"the model ({kind}) has no gated SiLU MLP (gate_proj, up_proj, down_proj) to split; "
            f"pass a Llama-style model ({', '.join(SUPPORTED_TYPES)})")
    if kind not in SUPPORTED_TYPES or getattr(config, "attention_bias", False) or getattr(
            config, "mlp_bias", False):
        raise ModelLoadError(
            f"the model ({kind}) does not map onto Mixtral's layout; pass one of "
            f"{', '.join(SUPPORTED_TYPES)} without attention or MLP biases")
    size = config.intermediate_size
    if size % options.experts:
        raise ConfigError(
            f"--experts {options.experts} does not divide the intermediate size {size}; "
            "choose a divisor of it")


def check_out_dir(out: Path) -> None:
    """Raise if `out` exists and holds anything (a checkpoint is never written over)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output directory {out} is not empty; pass a new or empty --out")


def encode_docs(tokenizer, prose: list[str], code: list[str],
                chats: list[list[dict[str, str]]]) -> list[list[int]]:
    """Token ids of each document; chats go through the tokenizer's chat template."""
    texts = list(prose) + list(code)
    texts += [tokenizer.apply_chat_template(c, tokenize=False) for c in chats]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def pack(docs: list[list[int]], eos: int, chunk_tokens: int) -> list[torch.Tensor]:
    """The documents joined by end-of-sequence tokens, cut into chunks of `chunk_tokens`."""
    flat: list[int] = []
    for doc in docs:
        flat += doc + [eos]
    return [torch.tensor(flat[i:i + chunk_tokens]) for i in range(0, len(flat), chunk_tokens)]


def text_chunks(dense: DenseModel, heldout: bool, options: MoefyOptions) -> list[torch.Tensor]:
    """The calibration (or held-out) text of `moefy_text`, tokenized, packed and capped."""
    t = moefy_text
    parts = (t.HELDOUT_PROSE, t.HELDOUT_CODE, t.HELDOUT_CHATS) if heldout else (
        t.CALIBRATION_PROSE, t.CALIBRATION_CODE, t.CALIBRATION_CHATS)
    eos = dense.tokenizer.eos_token_id
    chunks = pack(encode_docs(dense.tokenizer, *parts), eos, options.chunk_tokens)
    if options.max_tokens is not None:
        chunks = chunks[:max(1, options.max_tokens // options.chunk_tokens)]
    return chunks


@torch.inference_mode()
def trace_mlps(model, chunks: list[torch.Tensor]) -> list[LayerTrace]:
    """Every layer's MLP input and intermediate activation over `chunks`, run through `model`."""
    layers = model.model.layers
    xs: list[list[torch.Tensor]] = [[] for _ in layers]
    acts: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.mlp.register_forward_pre_hook(
            lambda _m, args, i=i: xs[i].append(args[0].reshape(-1, args[0].shape[-1]).float())))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda _m, args, i=i: acts[i].append(args[0].reshape(-1, args[0].shape[-1]).float())))
    try:
        for chunk in chunks:
            model(chunk[None])
    finally:
        for hook in hooks:
            hook.remove()
    return [LayerTrace(torch.cat(x), torch.cat(a)) for x, a in zip(xs, acts, strict=True)]


def balanced_groups(act: torch.Tensor, experts: int, iters: int, seed: int) -> torch.Tensor:
    """Neuron indices of each of `experts` equal-size co-activation clusters, `[E, I/E]`."""
    feats = act.abs().T
    feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)  # [I, T] unit profiles
    num = feats.shape[0]
    size = num // experts
    gen = torch.Generator().manual_seed(seed)
    centroids = feats[torch.randperm(num, generator=gen)[:experts]]
    labels = torch.full((num,), -1)
    for _ in range(iters):
        new = _balanced_assign(feats @ centroids.T, size)
        if torch.equal(new, labels):
            break
        labels = new
        centroids = torch.stack([feats[labels == e].mean(0) for e in range(experts)])
        centroids = centroids / centroids.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.stack([torch.nonzero(labels == e).flatten() for e in range(experts)])


def _balanced_assign(sim: torch.Tensor, size: int) -> torch.Tensor:
    """Capacity-limited assignment in rounds: every unplaced neuron bids for its most similar
    group that still has room; a group takes its most similar bidders up to its room."""
    num, experts = sim.shape
    labels = torch.full((num,), -1)
    room = torch.full((experts,), size)
    sim = sim.clone()
    while (labels < 0).any():
        free = torch.nonzero(labels < 0).flatten()
        want = sim[free].argmax(dim=1)
        for e in torch.unique(want).tolist():
            bidders = free[want == e]
            take = bidders[sim[bidders, e].argsort(descending=True)[:int(room[e])]]
            labels[take] = e
            room[e] -= len(take)
            if room[e] == 0:
                sim[:, e] = -torch.inf
    return labels


def group_scores(act: torch.Tensor, down: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Each group's contribution to each token's MLP output: the norm of `act_g @ down_g.T`,
    `[T, E]`."""
    return torch.stack([(act[:, g] @ down[:, g].T).norm(dim=1) for g in groups], dim=1)


def shares(scores: torch.Tensor) -> torch.Tensor:
    """Each group's share of the token's MLP output, `[T, E]`: what a router learns to rank."""
    return scores / scores.sum(dim=1, keepdim=True).clamp_min(1e-12)


def ridge_fit(x: torch.Tensor, target: torch.Tensor, ridge: float) -> torch.Tensor:
    """Ridge regression from `x [T, H]` onto `target [T, N]`: the weight `[N, H]`."""
    x64 = x.double()
    gram = x64.T @ x64
    lam = ridge * gram.diagonal().mean()
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram + lam * eye, x64.T @ target.double()).T.float()


def fit_router(x: torch.Tensor, scores: torch.Tensor, ridge: float) -> torch.Tensor:
    """A layer's router, `[E, H]`: ridge regression from `x [T, H]` onto the groups' shares,
    scaled so that no calibration logit exceeds `ROUTER_MARGIN`."""
    weight = ridge_fit(x, shares(scores), ridge)
    peak = (x @ weight.T).abs().max().clamp_min(1e-12)
    return weight * (ROUTER_MARGIN / peak)


def fit_pregate(x: torch.Tensor, scores: list[torch.Tensor], ridge: float) -> torch.Tensor:
    """Read-ME's one router for all layers, `[L, E, H]`: ridge regression from the first layer's
    MLP input `x [T, H]` onto every layer's group shares at once (one solve)."""
    target = torch.cat([shares(s) for s in scores], dim=1)
    return ridge_fit(x, target, ridge).view(len(scores), scores[0].shape[1], -1)


def split_layers(model, traces: list[LayerTrace], options: MoefyOptions) -> Split:
    """Cluster each layer's neurons into experts and fit its router."""
    split = Split()
    scores = []
    for i, trace in enumerate(traces):
        groups = balanced_groups(trace.act, options.experts, options.kmeans_iters,
                                 options.seed + i)
        down = model.model.layers[i].mlp.down_proj.weight.detach().float()
        split.groups.append(groups)
        scores.append(group_scores(trace.act, down, groups))
        split.routers.append(fit_router(trace.x, scores[-1], options.ridge))
    if options.pregate:
        split.pregate = fit_pregate(traces[0].x, scores, options.ridge)
    return split


def mixtral_config(config, options: MoefyOptions) -> MixtralConfig:
    """Mixtral's config for the dense `config` split as `options` says."""
    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
            "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "bos_token_id",
            "eos_token_id", "pad_token_id", "attention_dropout", "initializer_range")
    kwargs = {k: getattr(config, k) for k in keep if getattr(config, k, None) is not None}
    return MixtralConfig(
        **kwargs,
        intermediate_size=config.intermediate_size // options.experts,
        num_local_experts=options.experts,
        num_experts_per_tok=options.top_k,
        sliding_window=getattr(config, "sliding_window", None),
        use_cache=True,
    )


def build_moe(dense_model, split: Split, options: MoefyOptions) -> MixtralForCausalLM:
    """The Mixtral model: the dense weights, with each MLP's neurons stacked into experts."""
    state = {k: v.detach().float() for k, v in dense_model.state_dict().items()}
    for i, (groups, router) in enumerate(zip(split.groups, split.routers, strict=True)):
        prefix = f"model.layers.{i}.mlp."
        gate = state.pop(prefix + "gate_proj.weight")[groups]  # [E, I/E, H]
        up = state.pop(prefix + "up_proj.weight")[groups]
        down = state.pop(prefix + "down_proj.weight")[:, groups].permute(1, 0, 2)  # [E, H, I/E]
        state[prefix + "gate.weight"] = router
        state[prefix + "experts.gate_up_proj"] = torch.cat([gate, up], dim=1).contiguous()
        state[prefix + "experts.down_proj"] = (down * options.top_k).contiguous()
    config = mixtral_config(dense_model.config, options)
    moe = MixtralForCausalLM(config)
    moe.load_state_dict(state, strict=True)
    moe.generation_config = dense_model.generation_config
    return moe.eval()


@dataclass(slots=True)
class MoefyResult:
    """The moefied model and what went into it: `seconds` per stage."""

    dense: DenseModel
    moe: MixtralForCausalLM
    split: Split
    calibration_tokens: int
    seconds: dict[str, float]


def moefy(dense: DenseModel, options: MoefyOptions) -> MoefyResult:
    """Split `dense` into a Mixtral model as `options` says (calibration included)."""
    check_dense(dense.model, options)
    seconds: dict[str, float] = {}
    start = time.monotonic()
    chunks = text_chunks(dense, heldout=False, options=options)
    traces = trace_mlps(dense.model, chunks)
    seconds["trace"] = time.monotonic() - start
    start = time.monotonic()
    split = split_layers(dense.model, traces, options)
    seconds["split"] = time.monotonic() - start
    start = time.monotonic()
    moe = build_moe(dense.model, split, options)
    seconds["build"] = time.monotonic() - start
    return MoefyResult(dense, moe, split, sum(len(c) for c in chunks), seconds)


def save(result: MoefyResult, out: Path) -> None:
    """Write the moefied checkpoint (weights in the dense checkpoint's dtype) and tokenizer.

    The in-memory model is left holding the saved weights (rounded, back in float32), so what is
    measured afterwards is what was written."""
    out.mkdir(parents=True, exist_ok=True)
    if result.split.pregate is not None:
        save_pregate(result.split.pregate, result.moe, out)
    moe = result.moe.to(result.dense.save_dtype)
    try:
        moe.save_pretrained(out)
    finally:
        result.moe.float()
    result.dense.tokenizer.save_pretrained(out)
