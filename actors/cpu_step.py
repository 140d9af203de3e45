"""A forward step of a Llama-family model in bf16 on Baton's CPU kernels, without transformers'
modules (`CpuDecodeStep`).

At one token a row, a step's math is a few milliseconds of weight reads; driving it through
transformers' modules costs about as much again in Python (module calls, views, transposes, the
dozen small ops of rotary embedding): 10 of a 26 ms batch-1 step of the default model here. This
forward runs the same arithmetic straight on the kernels. Per layer: one RMSNorm, the q, k and v
projections, one rotary call each for q and k, Baton's paged attention function, the output
projection, one RMSNorm, the gate and up projections, SiLU times up, the down projection.

Steps of up to the skinny kernel's rows (`cpu_decode.skinny_rows`: 32, so every step this
forward takes) run q, k and v as one skinny matmul and gate and up as another. Each output row of
that kernel is its own sum, so the stacked projection gives the very values of the separate ones.
Where a projection is off the kernel (a weight it cannot block), the layers' own modules run
(oneDNN for bf16). int8 and int4 models on the skinny int8 and int4 kernels stack the same
projections for every step (those kernels take any number of rows), the layers' own weights
becoming views of the stacked one. Every other op is the one
transformers runs, so the tokens and logprobs are those of the transformers forward on the same
kernels, bit for bit (tests/actors/test_cpu_step.py). Longer steps (prompt chunks) keep
transformers' forward: there the Python costs little against the math, and its rotary ops,
vectorized over the chunk, beat the rotary kernel (a 1024-token prompt took 1.30 s that way
against 1.44 s here).

Where every projection of a layer is on a skinny kernel and the attention on Baton's, every
step the lean step takes (up to `MAX_TOKENS` tokens) whose runs the attention kernel's per-token
plan covers (each request's run up to `attention_plans.SHORT_RUN` tokens: decode rows, drafts,
short prompts) runs each layer as one C++ call (`cpu_decode.DecodeLayer`,
baton_kernels/cpu_layer.cpp): the same kernels and ATen ops in the same order, without the Python
between them (about 120 us a layer here: a bf16 token went from 14.6 to 10.5 ms, an int4 token
from 9.7 to 7.1 ms, two threads). A prefill worker's short prompt still pushes its KV layer by
layer: the step's `on_layer_done` runs after each layer's call.

A lone request's drafts stay within `exact_rows` (the speculator's `fast_tokens`): the steps
whose every projection, the LM head's included, runs a skinny kernel that sums each output row
as a one-row call does (bf16: the kernel's 32 rows; int8: every step; int4: 4 rows; the LM head
stays bf16). Its verified tokens then have the bits decoding would give them. When bf16 verify
steps of 9-16 rows went to oneDNN (before the skinny kernel took 32 rows without AMX), they
flipped greedy near-ties: 4-6 of the 14 `bench spec` requests left `none`'s tokens under ngram
or lookahead in each of three runs on an AMD EPYC.

Models: Llama, Qwen2 (with its q/k/v biases) and Qwen3 (with its q/k norms), with full attention
in every layer and default rotary embedding; others keep the transformers forward. Weight-only
quantized models (int8, int4) run here too; where their projections are not on Baton's
kernels (another dtype), through their own modules.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from baton.actors import paged_attention
from baton.actors.cpu_linear import PackedLinear
from baton.actors.cpu_norm import KernelRMSNorm
from baton.actors.quantized_linear import QuantizedLinear
from baton.kernels import cpu_decode

log = logging.getLogger(__name__)

ARCHITECTURES = frozenset({"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"})
MAX_TOKENS = 32  # the longest step it runs


@dataclass(slots=True)
class _Stacked:
    """Projections of one input stacked into one skinny-kernel weight (bf16, int8 or int4)."""

    weight: torch.Tensor  # packed for the kernel
    out_features: int
    bias: torch.Tensor | None
    scales: torch.Tensor | None  # int8's (float32) or int4's scales and zeros; None: bf16
    max_rows: int  # the longest step it runs
    group_size: int | None = None  # int4's; None: bf16 or int8

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.scales is None:
            return cpu_decode.skinny_linear(x, self.weight, self.out_features, self.bias)
        if self.group_size is not None:
            return cpu_decode.skinny_linear_int4(x, self.weight, self.scales, self.out_features,
                                                 self.group_size, self.bias)
        return cpu_decode.skinny_linear_int8(x, self.weight, self.scales, self.out_features,
                                             self.bias)


@dataclass(slots=True)
class _Layer:
    attn: nn.Module  # its projections; paged attention reads its `layer_idx`
    mlp: nn.Module
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    # q, k and v projections stacked for the skinny kernel; gate and up likewise (None where the
    # projections are not on a skinny kernel: another dtype, or too large)
    qkv: _Stacked | None
    gate_up: _Stacked | None
    # the whole layer in one C++ call (`cpu_decode.DecodeLayer`) for steps of up to
    # `fused_rows` tokens; None where a projection or the attention is not on Baton's kernels
    fused: object | None = None
    fused_rows: int = 0
    # the longest step whose every projection runs on a skinny kernel, where each output row is
    # its own sum: a draft token's row then has the bits it would have alone (0: none)
    exact_rows: int = 0


class CpuDecodeStep:
    """The forward of one engine step (see the module doc); build it with `of`."""

    def __init__(self, model, layers: list[_Layer], eps: float):
        config = model.config
        self.model = model
        self.layers = layers
        self.eps = eps
        self.head_dim = layers[0].attn.head_dim
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.intermediate = config.intermediate_size
        self.scaling = layers[0].attn.scaling
        self.fused_rows = min(layer.fused_rows for layer in layers)
        self.exact_rows = min(min(layer.exact_rows for layer in layers), _head_rows(model))

    @classmethod
    def of(cls, model) -> CpuDecodeStep | None:
        """The lean step for `model`, or None where it does not apply (another architecture, not
        bf16 on a CPU with the kernels, sliding windows)."""
        why = _unsupported(model)
        if why:
            log.debug("decode steps keep transformers' forward: %s", why)
            return None
        base = model.get_decoder()
        layers = [_layer(layer) for layer in base.layers]
        return cls(model, layers, float(base.norm.variance_epsilon))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, keep: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits `[R, V]` in the model's dtype, final hidden states `[R, H]`) of the rows
        `keep` of a step of `[1, T]` tokens, inside `paged_attention.attention_batch`."""
        base = self.model.get_decoder()
        hidden = base.embed_tokens(input_ids)[0]  # [T, H]
        cos, sin = base.rotary_emb(hidden, position_ids)
        t = hidden.shape[0]
        batch = paged_attention.current_batch()
        plan = batch.token_plan() if batch is not None and t <= self.fused_rows else None
        if plan is not None:  # every layer in one C++ call
            for layer in self.layers:
                idx = layer.attn.layer_idx
                k_cache, v_cache = batch.cache.layer(idx)
                hidden = layer.fused.forward(hidden, cos, sin, k_cache, v_cache,
                                             batch.slot_mapping, batch.block_tables, plan.rows,
                                             plan.base, plan.bits)
                if batch.on_layer_done is not None:
                    batch.on_layer_done(idx)
            hidden = base.norm(hidden).index_select(0, keep)
            return self.model.lm_head(hidden.unsqueeze(0))[0], hidden
        n_q = self.n_heads * self.head_dim
        n_kv = self.n_kv_heads * self.head_dim
        d = self.head_dim
        for layer in self.layers:
            # Else the layers' own modules (oneDNN for bf16 steps past the kernel's rows).
            skinny = layer.qkv is not None and t <= layer.qkv.max_rows
            x = cpu_decode.rms_norm(hidden, layer.input_norm, self.eps)
            attn = layer.attn
            if skinny:
                qkv = layer.qkv(x)
                q, k, v = qkv[:, :n_q], qkv[:, n_q : n_q + n_kv], qkv[:, n_q + n_kv :]
            else:
                q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            q = q.view(t, self.n_heads, d)
            k = k.view(t, self.n_kv_heads, d)
            v = v.view(t, self.n_kv_heads, d)
            if layer.q_norm is not None:
                q = cpu_decode.rms_norm(q, layer.q_norm, self.eps)
                k = cpu_decode.rms_norm(k, layer.k_norm, self.eps)
            q = cpu_decode.rope(q, cos, sin)
            k = cpu_decode.rope(k, cos, sin)
            out, _ = paged_attention.paged_attention_forward(
                attn, q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2),
                v.unsqueeze(0).transpose(1, 2), None, self.scaling)
            hidden = hidden + attn.o_proj(out.reshape(t, n_q))
            x = cpu_decode.rms_norm(hidden, layer.post_norm, self.eps)
            mlp = layer.mlp
            if skinny:
                gate_up = layer.gate_up(x)
                gate, up = gate_up[:, : self.intermediate], gate_up[:, self.intermediate :]
            else:
                gate, up = mlp.gate_proj(x), mlp.up_proj(x)
            hidden = hidden + mlp.down_proj(F.silu(gate) * up)
        hidden = base.norm(hidden).index_select(0, keep)
        return self.model.lm_head(hidden.unsqueeze(0))[0], hidden


def _unsupported(model) -> str | None:
    """Why `CpuDecodeStep` cannot run `model` (None: it can)."""
    name = type(model).__name__
    if name not in ARCHITECTURES:
        return f"{name} is not one of {sorted(ARCHITECTURES)}"
    config = model.config
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "mlp_bias", False):
        return "the MLP is not Llama's (SiLU, no bias)"
    base = model.get_decoder()
    rope_type = getattr(base.rotary_emb, "rope_type", "default")
    if rope_type != "default":
        return f"rotary embedding {rope_type!r}"
    if not isinstance(base.norm, KernelRMSNorm) or cpu_decode.kernel() is None:
        return "not bf16 on a CPU with Baton's kernels"
    for layer in base.layers:
        attn = layer.self_attn
        why = layer_unsupported(layer)
        if why:
            return why
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        norms += [getattr(attn, n) for n in ("q_norm", "k_norm") if hasattr(attn, n)]
        if not all(isinstance(n, KernelRMSNorm) for n in norms):
            return "a norm is not on the kernel"
    return None


def layer_unsupported(layer: nn.Module) -> str | None:
    """Why a lean forward (this one, or the captured CUDA step) cannot run this decoder layer
    of a supported architecture: a sliding window, or an MLP other than gate, up and down."""
    if getattr(layer.self_attn, "sliding_window", None):
        return "a layer attends through a sliding window"
    if not all(hasattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return "a layer's MLP is not gate, up and down projections"
    return None


def _on_skinny(layer: nn.Module) -> bool:
    """Whether every projection of `layer` runs every call of a lean step (up to `MAX_TOKENS`
    rows) on the skinny kernel (not where they are quantized, or too large)."""
    attn, mlp = layer.self_attn, layer.mlp
    return all(isinstance(p, PackedLinear) and p.skinny_rows >= MAX_TOKENS
               for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                         mlp.gate_proj, mlp.up_proj, mlp.down_proj))


def _on_skinny_quantized(parent: nn.Module, names: tuple[str, ...]) -> bool:
    """Whether the projections `names` of `parent` are all int8 or all int4 (one group size) on
    Baton's kernel, in whole blocks (so that their packed weights stack block by block)."""
    projections = [getattr(parent, n) for n in names]
    if not all(isinstance(p, QuantizedLinear) and p.skinny for p in projections):
        return False
    modes = {(p.mode, p.group_size) for p in projections}
    block = cpu_decode.INT4_BLOCK if projections[0].mode == "int4" else cpu_decode.SKINNY_BLOCK
    return len(modes) == 1 and all(p.out_features % block == 0 for p in projections)


def _layer(layer: nn.Module) -> _Layer:
    attn, mlp = layer.self_attn, layer.mlp
    qkv = gate_up = None
    attn_names, mlp_names = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")
    if _on_skinny(layer) or (_on_skinny_quantized(attn, attn_names)
                             and _on_skinny_quantized(mlp, mlp_names)):
        qkv, gate_up = _stacked(attn, attn_names), _stacked(mlp, mlp_names)
    q_norm = getattr(attn, "q_norm", None)
    k_norm = getattr(attn, "k_norm", None)
    lean = _Layer(attn, mlp, layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                  None if q_norm is None else q_norm.weight,
                  None if k_norm is None else k_norm.weight,
                  qkv, gate_up)
    lean.fused, lean.fused_rows, lean.exact_rows = _fused(layer, lean)
    return lean


def _fused(layer: nn.Module, lean: _Layer) -> tuple[object | None, int, int]:
    """The layer as one `cpu_decode.DecodeLayer`, the longest step it runs and the longest whose
    projections all run on their skinny kernels (`_Layer.exact_rows`), built once and kept on
    `layer`; (None, 0, 0) where its projections or attention are not all on the kernels."""
    cached = getattr(layer, "_baton_fused", None)
    if cached is not None:
        return cached
    attn, mlp = lean.attn, lean.mlp
    o, down = _projection(attn.o_proj), _projection(mlp.down_proj)
    config = layer.self_attn.config
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    d = attn.head_dim
    attention_ok = n_heads % n_kv == 0 and n_heads // n_kv <= 16 and d % 16 == 0 and d <= 256
    if lean.qkv is None or lean.gate_up is None or o is None or down is None or not attention_ok:
        return None, 0, 0
    ext = cpu_decode.kernel()
    qkv, gate_up = (ext.Projection(s.weight, s.scales, s.out_features,
                                   s.group_size or (0 if s.scales is None else -1), s.bias)
                    for s in (lean.qkv, lean.gate_up))
    fused = ext.DecodeLayer(lean.input_norm, lean.post_norm, lean.q_norm, lean.k_norm,
                            qkv, o[0], gate_up, down[0], n_heads, n_kv, d,
                            float(layer.input_layernorm.variance_epsilon), float(attn.scaling))
    exact = min(MAX_TOKENS, lean.qkv.max_rows, o[1], lean.gate_up.max_rows, down[1])
    if lean.qkv.group_size is not None:  # int4
        exact = min(exact, cpu_decode.INT4_EXACT_ROWS)
    layer._baton_fused = (fused, MAX_TOKENS, exact)
    return fused, MAX_TOKENS, exact


def _head_rows(model) -> int:
    """Up to how many rows the output head gives each row the bits of a one-row call: its
    skinny kernel's rows (heads stay bf16 in quantized models too); `MAX_TOKENS` where it is not
    on the kernel, which knows no such limit."""
    head = model.get_output_embeddings()
    if isinstance(head, PackedLinear) and head.skinny_weight is not None:
        return head.skinny_rows
    return MAX_TOKENS


def _projection(linear: nn.Module) -> tuple[object, int] | None:
    """`linear` as a `cpu_decode.Projection` and the most rows it takes there, or None where it
    is not on a skinny kernel."""
    ext = cpu_decode.kernel()
    if isinstance(linear, PackedLinear) and linear.skinny_weight is not None:
        return (ext.Projection(linear.skinny_weight, None, linear.out_features, 0, linear.bias),
                linear.skinny_rows)
    if isinstance(linear, QuantizedLinear) and linear.skinny:
        if linear.mode == "int8":
            return (ext.Projection(linear.packed_weight, linear.scales, linear.out_features, -1,
                                   linear.bias), MAX_TOKENS)
        return (ext.Projection(linear.packed_weight, linear.scale_zeros, linear.out_features,
                               linear.group_size, linear.bias), MAX_TOKENS)
    return None


def _stacked(parent: nn.Module, names: tuple[str, ...]) -> _Stacked:
    """The projections `names` of `parent` (bf16, int8 or int4) as one packed weight (and bias),
    built once and kept on `parent`, so that the weights are held once."""
    cached = getattr(parent, "_baton_stacked", None)
    if cached is None:
        layers = [getattr(parent, n) for n in names]
        bias = None if layers[0].bias is None else torch.cat([p.bias for p in layers])
        if not isinstance(layers[0], QuantizedLinear):
            cached = _stack_bf16(layers, bias)
        elif layers[0].mode == "int8":
            cached = _stack_int8(layers, bias)
        else:
            cached = _stack_int4(layers, bias)
        parent._baton_stacked = cached
    return cached


def _stack_bf16(linears: list[nn.Module], bias: torch.Tensor | None) -> _Stacked:
    """The projections free their own skinny copies: their decode-sized calls run on the stack,
    and they keep their oneDNN weights for the rest."""
    weight = torch.cat([p.weight for p in linears])
    for p in linears:
        p.skinny_weight = None
    return _Stacked(cpu_decode.pack_skinny(weight), weight.shape[0], bias, None,
                    cpu_decode.skinny_rows(weight))


def _stack_int8(layers: list[nn.Module], bias: torch.Tensor | None) -> _Stacked:
    """Each projection's packed weight and scales become views of the stacked ones."""
    weight = torch.cat([p.packed_weight for p in layers])  # whole blocks of four rows
    scales = torch.cat([p.scales for p in layers])
    blocks = rows = 0
    for p in layers:
        n = p.out_features
        p.packed_weight = weight[blocks : blocks + n // cpu_decode.SKINNY_BLOCK]
        p.scales = scales[rows : rows + n]
        blocks, rows = blocks + n // cpu_decode.SKINNY_BLOCK, rows + n
    return _Stacked(weight, rows, bias, scales, MAX_TOKENS)


def _stack_int4(layers: list[nn.Module], bias: torch.Tensor | None) -> _Stacked:
    """Each projection's packed weight and scales become views of the stacked ones."""
    weight = torch.cat([p.packed_weight for p in layers])  # whole blocks of 16 rows
    scale_zeros = torch.cat([p.scale_zeros for p in layers])
    blocks = 0
    for p in layers:
        n = p.out_features // cpu_decode.INT4_BLOCK
        p.packed_weight = weight[blocks : blocks + n]
        p.scale_zeros = scale_zeros[blocks : blocks + n]
        blocks += n
    rows = sum(p.out_features for p in layers)
    return _Stacked(weight, rows, bias, scale_zeros, MAX_TOKENS, layers[0].group_size)
