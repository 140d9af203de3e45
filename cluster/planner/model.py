"""A model as the cost model sees it: parameters, bytes read per step, FLOPs and KV bytes per token.

Read from a transformers `config.json` (a path, Baton's own model source for `default`, or one of a
few built-in published configs, so `--model llama-3-70b` needs no download). Mixture-of-experts
configs (`num_local_experts` / `num_experts`, `num_experts_per_tok`) count every expert's weights
as resident and only the routed ones as computed per token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baton.actors.model_source import resolve
from baton.errors import ConfigError, ModelNotFoundError

_LLAMA3 = {"vocab_size": 128256, "num_key_value_heads": 8, "tie_word_embeddings": False}
BUILTIN: dict[str, dict[str, Any]] = {
    "llama-3-8b": {**_LLAMA3, "hidden_size": 4096, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "intermediate_size": 14336,
                   "_name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct"},
    "llama-3-70b": {**_LLAMA3, "hidden_size": 8192, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "intermediate_size": 28672,
                    "_name_or_path": "meta-llama/Meta-Llama-3-70B-Instruct"},
    "mixtral-8x7b": {"vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8,
                     "intermediate_size": 14336, "num_local_experts": 8,
                     "num_experts_per_tok": 2, "tie_word_embeddings": False,
                     "_name_or_path": "mistralai/Mixtral-8x7B-Instruct-v0.1"},
    "smollm2-135m": {"vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3,
                     "intermediate_size": 1536, "tie_word_embeddings": True,
                     "_name_or_path": "default"},
}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "int8": 1}


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """Sizes of one model at one dtype; `serve_name` is what a cluster config's `model` says."""

    name: str
    serve_name: str
    num_layers: int
    hidden: int
    q_dim: int  # attention heads x head dim
    params: float  # every weight
    active_params: float  # weights one token computes with (MoE: routed experts only)
    expert_params: float  # all experts' weights (0 for a dense model)
    num_experts: int
    experts_per_token: int
    kv_bytes_per_token: float
    dtype_bytes: int

    @property
    def weight_bytes(self) -> float:
        return self.params * self.dtype_bytes

    @property
    def flops_per_token(self) -> float:
        """Matmul FLOPs per token outside attention over the context (2 per active weight)."""
        return 2 * self.active_params

    def attention_flops(self, token_context: float) -> float:
        """FLOPs of attention scores and values over `token_context` (sum of context lengths)."""
        return 4 * self.num_layers * self.q_dim * token_context

    def weight_bytes_read(self, tokens: int) -> float:
        """Weight bytes one step over `tokens` tokens reads: dense weights, plus the experts the
        tokens route to (each expert hit at least once with probability 1-(1-k/E)^tokens)."""
        if not self.num_experts:
            return self.weight_bytes
        dense = self.params - self.expert_params
        hit = 1 - (1 - self.experts_per_token / self.num_experts) ** max(tokens, 1)
        return (dense + self.expert_params * hit) * self.dtype_bytes


def profile_from_config(cfg: dict[str, Any], name: str, dtype: str = "bfloat16") -> ModelProfile:
    """The profile of a transformers config dict; `ConfigError` naming a missing field."""
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"dtype {dtype!r} unknown; use one of {sorted(DTYPE_BYTES)}")
    try:
        h = int(cfg["hidden_size"])
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        vocab = int(cfg["vocab_size"])
        inter = int(cfg.get("intermediate_size") or cfg["moe_intermediate_size"])
    except KeyError as exc:
        raise ConfigError(f"model config {name!r} lacks {exc.args[0]}; give a transformers "
                          "decoder config (config.json)") from exc
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or h // heads)
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    per_tok = int(cfg.get("num_experts_per_tok") or 0) if experts else 0
    attn = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2
    mlp = 3 * h * int(cfg.get("moe_intermediate_size") or inter)
    router = h * experts
    embed = vocab * h
    head = 0 if cfg.get("tie_word_embeddings", False) else vocab * h
    experts_all = layers * mlp * experts
    per_layer_dense = attn + router + (0 if experts else mlp)
    params = embed + head + layers * per_layer_dense + experts_all
    # The input embedding is a lookup, not a matmul; a tied one is still the output head's.
    active = (vocab * h) + layers * per_layer_dense + layers * mlp * per_tok
    dtype_bytes = DTYPE_BYTES[dtype]
    return ModelProfile(
        name=name, serve_name=str(cfg.get("_name_or_path") or name), num_layers=layers,
        hidden=h, q_dim=heads * head_dim, params=float(params), active_params=float(active),
        expert_params=float(experts_all), num_experts=experts, experts_per_token=per_tok,
        kv_bytes_per_token=float(2 * layers * kv_heads * head_dim * dtype_bytes),
        dtype_bytes=dtype_bytes)


def load_model(spec: str, dtype: str = "bfloat16") -> ModelProfile:
    """A built-in name, a `config.json` path, or anything Baton's model source resolves offline
    (`default`, a model directory); a measured profile carries its own model's config."""
    if spec in BUILTIN:
        return profile_from_config(BUILTIN[spec], spec, dtype)
    path = Path(spec).expanduser()
    if path.is_file() and path.name.endswith(".json"):
        return _from_file(path, path.parent.name, spec, dtype)
    source = resolve(spec)
    cfg_path = Path(str(source.path)) / "config.json"
    if not cfg_path.is_file():
        raise ModelNotFoundError(f"model {spec!r}: no config.json offline; give a built-in name "
                                 f"({', '.join(sorted(BUILTIN))}) or a config.json path")
    return _from_file(cfg_path, source.name, spec, dtype)


def _from_file(path: Path, name: str, serve_name: str, dtype: str) -> ModelProfile:
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]
    return profile_from_config({**cfg, "_name_or_path": serve_name}, name, dtype)
