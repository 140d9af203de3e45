"""The lean bf16 forward step (`CpuDecodeStep`): the tokens and logprobs of transformers' forward
on the same kernels, bit for bit (the same engine code against itself, so this holds on every CPU
that runs the kernels), for prompt chunks, batches and drafts; the models it leaves to
transformers; its rotary kernel against transformers' own.

Skipped where the CPU kernels do not run (no avx512_bf16, or BATON_CPU_KERNELS=0).
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from baton.actors import cpu_step, model_runner
from baton.actors.cpu_step import CpuDecodeStep
from baton.actors.engine import Engine
from baton.actors.handoff import HandoffEngine
from baton.actors.kv_link import KVReceiver, KVSender
from baton.actors.model_runner import BatchRow
from baton.actors.tiny import tiny_model
from baton.kernels import cpu_decode
from baton.sampling import SamplingParams
from tests.actors.test_handoff import TOKEN, handoff
from tests.conftest import assert_no_leaks, run_to_completion

pytestmark = pytest.mark.skipif(not cpu_decode.wanted(),
                                reason="no avx512_bf16 here, or BATON_CPU_KERNELS=0")

PROMPTS = [list(range(5, 40)), [3, 1, 4, 1, 5], [7] * 12 + [8, 9] * 6]


def engines(arch: str, monkeypatch, **kw) -> tuple[Engine, Engine]:
    """Two engines on the same weights: one with the lean step, one on transformers' forward."""
    lean = Engine(f"tiny:{arch}", dtype="bfloat16", **kw)
    with monkeypatch.context() as m:
        m.setattr(model_runner.CpuDecodeStep, "of", classmethod(lambda cls, model: None))
        plain = Engine(f"tiny:{arch}", dtype="bfloat16", **kw)
    assert lean.runner.decode_step is not None and plain.runner.decode_step is None
    return lean, plain


def count_steps(engine: Engine, monkeypatch) -> list[int]:
    """Token counts of the steps the lean forward ran."""
    seen: list[int] = []
    step = engine.runner.decode_step
    real = step.forward
    monkeypatch.setattr(step, "forward",
                        lambda ids, pos, keep: seen.append(ids.shape[1]) or real(ids, pos, keep))
    return seen


def same_outputs(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        assert [t.logprob for t in x.logprobs] == [t.logprob for t in y.logprobs]
        assert [t.top for t in x.logprobs] == [t.top for t in y.logprobs]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_batched_decode_matches_the_transformers_forward_bit_for_bit(arch, monkeypatch):
    lean, plain = engines(arch, monkeypatch, max_num_batched_tokens=16)
    seen = count_steps(lean, monkeypatch)
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=3)
    same_outputs(lean.generate(PROMPTS, params), plain.generate(PROMPTS, params))
    # Three rows decoding together ran here (stacked projections), and so did the prompts,
    # chunked by 16 (the layers' own projections).
    assert 3 in seen and 16 in seen and max(seen) <= cpu_step.MAX_TOKENS
    assert lean.block_violations() == [] and plain.block_violations() == []


def test_drafted_runs_verify_on_the_lean_step_with_the_same_tokens(monkeypatch):
    """n-gram drafts make verify runs of several tokens a row. k is fixed: adaptive k follows
    each engine's measured step times, and with sampling another k draws other random numbers."""
    lean, plain = engines("llama", monkeypatch, methods=["ngram"])
    seen = count_steps(lean, monkeypatch)
    prompt = [10, 11, 12, 13, 14] * 8
    spec = dict(max_tokens=24, ignore_eos=True, method="ngram", num_speculative_tokens=4,
                logprobs=1)
    for params in (SamplingParams(**spec), SamplingParams(**spec, temperature=0.8, seed=7)):
        a, b = lean.generate([prompt], params), plain.generate([prompt], params)
        same_outputs(a, b)
        assert a[0].metrics.spec_draft_tokens > 0
    assert any(n > 1 for n in seen)


@pytest.mark.parametrize("arch", ["mistral", "gemma", "mixtral"])
def test_models_it_does_not_cover_keep_the_transformers_forward(arch):
    """Mistral's sliding window, Gemma's norm and embedding scale, Mixtral's experts."""
    assert Engine(f"tiny:{arch}", dtype="bfloat16").runner.decode_step is None


def test_float32_models_keep_the_transformers_forward():
    assert Engine("tiny:llama", dtype="float32").runner.decode_step is None


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_models_run_their_own_projections_on_the_lean_step(quantization,
                                                                      monkeypatch):
    """The same tokens and logprobs; int8 and int4 projections on Baton's kernels are stacked
    as bf16 ones are."""
    lean, plain = engines("llama", monkeypatch, quantization=quantization,
                          quant_group_size=32)
    assert all(layer.qkv is not None and layer.gate_up is not None
               for layer in lean.runner.decode_step.layers)
    seen = count_steps(lean, monkeypatch)
    params = SamplingParams(max_tokens=10, ignore_eos=True, logprobs=3)
    same_outputs(lean.generate(PROMPTS, params), plain.generate(PROMPTS, params))
    assert 3 in seen


class _Counted:
    """A fused layer whose calls are counted."""

    def __init__(self, fused, calls: list[int]):
        self.fused, self.calls = fused, calls

    def forward(self, hidden, *args):
        self.calls.append(hidden.shape[0])
        return self.fused.forward(hidden, *args)


@pytest.mark.parametrize(("arch", "quantization"), [("llama", None), ("qwen2", None),
                                                    ("qwen3", None), ("llama", "int8"),
                                                    ("llama", "int4")])
def test_short_steps_run_each_layer_in_one_call_with_the_same_tokens(arch, quantization,
                                                                     monkeypatch):
    """Steps of up to `fused_rows` tokens (every run the attention plan takes) run every layer
    as one C++ call, the same kernels and ops in the same order, prompt chunks of 16 tokens
    included. Longer steps run the Python layers."""
    lean, plain = engines(arch, monkeypatch, quantization=quantization,
                          max_num_batched_tokens=16)
    step = lean.runner.decode_step
    assert step.fused_rows == cpu_step.MAX_TOKENS
    assert lean.speculator.fast_tokens == step.exact_rows  # drafts keep steps on the layers
    calls: list[int] = []
    for layer in step.layers:
        layer.fused = _Counted(layer.fused, calls)
    params = SamplingParams(max_tokens=10, ignore_eos=True, logprobs=3)
    same_outputs(lean.generate(PROMPTS, params), plain.generate(PROMPTS, params))
    assert 3 in calls and max(calls) <= step.fused_rows
    assert max(calls) == 16  # a prompt chunk
    assert len(calls) % len(step.layers) == 0  # whole steps, every layer


@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_drafts_stay_within_the_rows_each_computed_as_if_alone(quantization):
    """A lone request's drafts keep its steps within `exact_rows`: the rows on which every
    projection, the LM head's included, runs a skinny kernel, whose output rows are each their
    own sum, so a draft token's row has the bits of that row computed alone. In bf16 that is the
    kernel's rows (8 with AVX-512, 32 on AMX; past them oneDNN sums another way); int8 layers
    take every step, int4 up to 4 rows (longer calls sum in another order); the LM head stays
    bf16."""
    engine = Engine("tiny:llama", dtype="bfloat16", quantization=quantization)
    step = engine.runner.decode_step
    bf16 = cpu_decode.amx_rows() or cpu_decode.MAX_ROWS
    rows = {None: bf16, "int8": bf16, "int4": cpu_decode.INT4_EXACT_ROWS}[quantization]
    assert step.exact_rows == rows and engine.speculator.fast_tokens == rows
    torch.manual_seed(0)
    head = engine.model.lm_head
    projections = [(head, head.in_features)]
    for layer in step.layers:
        hidden = layer.attn.o_proj.out_features
        projections += [(layer.qkv, hidden), (layer.gate_up, hidden),
                        (layer.attn.o_proj, layer.attn.o_proj.in_features),
                        (layer.mlp.down_proj, layer.mlp.down_proj.in_features)]
    for project, width in projections:
        x = torch.randn(rows, width, dtype=torch.bfloat16)
        together = project(x)
        alone = torch.cat([project(x[i : i + 1]) for i in range(rows)])
        assert torch.equal(together, alone)


def test_a_head_that_sums_fewer_rows_alone_caps_the_step():
    """The LM head counts: a head on the kernel for fewer rows than the layers (past them its
    calls go to oneDNN) caps `exact_rows` at its rows."""
    engine = Engine("tiny:llama", dtype="bfloat16")
    engine.model.lm_head.skinny_rows = 2
    assert CpuDecodeStep.of(engine.model).exact_rows == 2


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_a_batch_of_short_runs_past_seventeen_tokens_runs_fused(quantization, monkeypatch):
    """The fused layers take any step of short runs up to `MAX_TOKENS` in all: two 12-token
    prompts in one step give the transformers forward's logits, bit for bit."""
    lean, plain = engines("llama", monkeypatch, quantization=quantization,
                          quant_group_size=32)
    calls: list[int] = []
    for layer in lean.runner.decode_step.layers:
        layer.fused = _Counted(layer.fused, calls)
    prompts = [list(range(30, 42)), list(range(60, 72))]
    bs = lean.cache.spec.block_size
    rows = [BatchRow(p, 0, len(p), [1 + i * 2, 2 + i * 2][: (len(p) + bs - 1) // bs], len(p))
            for i, p in enumerate(prompts)]
    logits = lean.runner.run_rows(rows)
    assert torch.equal(logits, plain.runner.run_rows(rows))
    assert calls == [24] * len(lean.runner.decode_step.layers)


def test_a_prefill_worker_pushes_each_fused_layer_as_it_ends():
    """A short prompt prefilled on the fused layers still hands its KV over layer by layer."""
    engine = {"model": "tiny:qwen2", "dtype": "bfloat16", "block_size": 8}
    prefill, decode = HandoffEngine(**engine), HandoffEngine(**engine)
    assert prefill.runner.decode_step.fused_rows >= 6
    receiver = KVReceiver(decode.cache, token=TOKEN)
    sender = KVSender(receiver.address, TOKEN, chunk_bytes=4096)
    try:
        prompt = [11, 12, 13, 14, 15, 16]
        params = SamplingParams(max_tokens=8, ignore_eos=True)
        res, pushed = handoff(prefill, decode, receiver, sender, prompt, params, "fused")
        assert pushed.layers_received == prefill.model.config.num_hidden_layers
        out = run_to_completion(decode)[res.request_id]
        assert out.token_ids == Engine(**engine).generate([prompt], params)[0].token_ids
        assert_no_leaks(prefill)
        assert_no_leaks(decode)
    finally:
        sender.close()
        receiver.stop(None)


def test_the_stacked_projections_are_held_once():
    """q/k/v and gate/up move to one packed weight each; the layers keep their oneDNN weights
    (for prompt chunks) and no second skinny copy."""
    engine = Engine("tiny:llama", dtype="bfloat16")
    layer = engine.model.get_decoder().layers[0]
    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.up_proj):
        assert proj.skinny_weight is None
    assert layer.self_attn.o_proj.skinny_weight is not None
    lean = engine.runner.decode_step.layers[0]
    wanted = torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                        layer.self_attn.v_proj.weight])
    assert torch.equal(cpu_decode.unpack_skinny(lean.qkv.weight, wanted.shape[0]), wanted)
    # A second step over the same model (a layer-skip draft does this) reuses them.
    again = CpuDecodeStep.of(engine.model)
    assert again is not None and again.layers[0].qkv is lean.qkv


def test_stacked_int8_projections_are_held_once():
    """int8 q/k/v and gate/up stack too, each projection's weight and scales then a view of the
    stacked ones: its own calls (prompt chunks) and the stack's read the same bytes."""
    engine = Engine("tiny:llama", dtype="bfloat16", quantization="int8")
    attn = engine.model.get_decoder().layers[0].self_attn
    lean = engine.runner.decode_step.layers[0].qkv
    assert lean is not None and lean.scales is not None
    start = lean.weight.data_ptr()
    end = start + lean.weight.numel()
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert start <= proj.packed_weight.data_ptr() < end
    assert torch.equal(torch.cat([attn.q_proj.scales, attn.k_proj.scales, attn.v_proj.scales]),
                       lean.scales)


def test_stacked_int4_projections_are_held_once():
    engine = Engine("tiny:llama", dtype="bfloat16", quantization="int4")
    mlp = engine.model.get_decoder().layers[0].mlp
    lean = engine.runner.decode_step.layers[0].gate_up
    assert lean is not None and lean.group_size == 64
    start = lean.weight.data_ptr()
    end = start + lean.weight.numel()
    for proj in (mlp.gate_proj, mlp.up_proj):
        assert proj.skinny and start <= proj.packed_weight.data_ptr() < end
    assert torch.equal(torch.cat([mlp.gate_proj.scale_zeros, mlp.up_proj.scale_zeros]),
                       lean.scales)


@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_the_rotary_kernel_is_transformers_rotary_bit_for_bit(tokens):
    model = tiny_model("qwen3", torch.bfloat16)
    rotary = model.get_decoder().rotary_emb
    torch.manual_seed(tokens)
    heads, d = 4, model.config.head_dim
    x = (torch.randn(tokens, heads, d) * 3).to(torch.bfloat16)
    positions = torch.randint(0, 2000, (1, tokens))
    cos, sin = rotary(x, positions)
    want, _ = apply_rotary_pos_emb(x.transpose(0, 1).unsqueeze(0), x.transpose(0, 1).unsqueeze(0),
                                   cos, sin)
    assert torch.equal(cpu_decode.rope(x, cos, sin), want[0].transpose(0, 1))
