"""Baton's bf16 CPU decode kernels. The skinny matmul: exact sums rounded once, the shapes it
takes and refuses, and the packed linear layers that hand it their decode-sized calls. The decode
attention, on AVX-512 and (where the CPU has it) on AMX tiles: the torch path's results on the same
prepared steps (decode rows, chains, trees, short prompts), a token's bits whatever shares its
call, and an engine that decodes the same on either path.

Skipped on CPUs without avx512_bf16 (where oneDNN runs every linear) and with the kernels off;
where the CPU has it, a kernel that fails to build fails here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from baton.actors import paged_attention
from baton.actors.cpu_linear import PackedLinear, packing_supported
from baton.actors.draft_tree import DraftTree
from baton.actors.kv_cache import KVCacheSpec, PagedKVCache
from baton.actors.model_runner import BatchRow, ModelRunner
from baton.kernels import cpu_decode

pytestmark = pytest.mark.skipif(not cpu_decode.wanted(),
                                reason="no avx512_bf16 here, or BATON_CPU_KERNELS=0")


def test_the_kernels_build_on_a_cpu_that_has_avx512_bf16():
    """A build failure would leave oneDNN and torch running silently: here it fails instead."""
    assert cpu_decode.kernel() is not None


def bf16_exact(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The product of the bf16 values in float64: what fp32 accumulation approximates."""
    y = x.double() @ w.double().T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33])
@pytest.mark.parametrize(("n", "k"), [(1, 32), (5, 64), (36, 64), (193, 576), (576, 1536)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_skinny_linear_is_the_exact_sum_rounded_to_bf16(rows, n, k, with_bias):
    """Every output within one bf16 step of the exact sum, plus what fp32 accumulation may add
    (K roundings of at most 2^-24 of the terms' magnitudes: it shows where the sum cancels to
    near zero), for row counts across the kernel's 8-row passes and AMX's 16-row tiles and
    weights with ragged tails."""
    torch.manual_seed(rows * 1000 + n)
    x = torch.randn(1, rows, k).to(torch.bfloat16)
    w = torch.randn(n, k).to(torch.bfloat16)
    bias = torch.randn(n).to(torch.bfloat16) if with_bias else None
    y = cpu_decode.skinny_linear(x, cpu_decode.pack_skinny(w), n, bias)
    assert y.shape == (1, rows, n) and y.dtype == torch.bfloat16
    exact = bf16_exact(x, w, bias)
    step = exact.abs() * 2.0**-7 + 1e-6  # one bf16 ulp of the exact value, at most
    accumulation = k * 2.0**-24 * bf16_exact(x.abs(), w.abs(), None if bias is None else bias.abs())
    assert ((y.double() - exact).abs() <= step + accumulation).all()
    # Against the same math in float32 (what F.linear computes before it rounds), mostly equal.
    ref = nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float())
    assert (y == ref.to(torch.bfloat16)).float().mean() > 0.95


def test_shapes_the_kernel_cannot_take_are_refused_and_left_to_onednn():
    w = torch.randn(8, 48).to(torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 32, got 48"):
        cpu_decode.pack_skinny(w)
    # 6 rows packed as 16 (with AMX two blocks of four, 8): 17 outputs cannot be in it
    packed = cpu_decode.pack_skinny(torch.randn(6, 64).to(torch.bfloat16))
    x = torch.randn(1, 64).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="cannot have 17 rows"):
        cpu_decode.skinny_linear(x, packed, 17)
    with pytest.raises(RuntimeError, match="rows of 32 against a weight of 64"):
        cpu_decode.skinny_linear(x[:, :32], packed, 6)
    assert cpu_decode.skinny_rows(w) == 0
    assert cpu_decode.skinny_rows(torch.randn(8, 64)) == 0  # float32: oneDNN's
    amx = cpu_decode.amx_rows()  # with AMX, every weight's calls of up to 32 rows
    for shape in ((49152, 576), (1536, 576)):  # an LM head, a projection
        assert cpu_decode.skinny_rows(torch.randn(shape).to(torch.bfloat16)) == (
            amx or cpu_decode.MAX_ROWS)


def test_a_rows_result_does_not_depend_on_the_rows_beside_it():
    """Every call the kernel takes (up to `skinny_rows`: 8 on AVX-512, 32 on AMX) gives each row
    the bits it gets alone: a verify step's or a batch's rows come out as single decode rows
    would."""
    torch.manual_seed(3)
    w = torch.randn(200, 576).to(torch.bfloat16)
    packed = cpu_decode.pack_skinny(w)
    bias = torch.randn(200).to(torch.bfloat16)
    x = torch.randn(cpu_decode.skinny_rows(w), 576).to(torch.bfloat16)
    alone = torch.cat([cpu_decode.skinny_linear(row[None], packed, 200, bias) for row in x])
    for rows in sorted({2, 5, 16, 17, len(x)} & set(range(2, len(x) + 1))):
        assert torch.equal(cpu_decode.skinny_linear(x[:rows], packed, 200, bias), alone[:rows])


@pytest.mark.skipif(not {"amx_bf16", "amx_tile"} <= cpu_decode.cpu_flags(),
                    reason="no AMX on this CPU")
def test_the_kernel_runs_on_amx_where_the_cpu_has_it_unless_turned_off():
    """On a CPU with AMX the skinny matmul takes 32 rows (AMX tiles); `BATON_CPU_AMX=0` keeps it
    on AVX-512 at `MAX_ROWS` (a separate process: the choice is made once per process)."""
    assert cpu_decode.amx_rows() == 32
    code = ("from baton.kernels import cpu_decode; import torch; "
            "print(cpu_decode.amx_rows(), "
            "cpu_decode.skinny_rows(torch.zeros(64, 64, dtype=torch.bfloat16)))")
    env = {**os.environ, "BATON_CPU_AMX": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=300).stdout.split()
    assert out == ["0", str(cpu_decode.MAX_ROWS)]


@pytest.mark.skipif(not packing_supported(torch.bfloat16, torch.device("cpu")),
                    reason="oneDNN cannot pack bf16 on this CPU")
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_runs_decode_rows_on_the_kernel_and_prompts_on_onednn(bias):
    torch.manual_seed(0)
    linear = nn.Linear(576, 1536, bias=bias).to(torch.bfloat16)
    layer = PackedLinear(linear)
    onednn = PackedLinear(linear, skinny_rows=0)
    most = cpu_decode.skinny_rows(linear.weight)
    assert layer.skinny_rows == most >= cpu_decode.MAX_ROWS and onednn.skinny_weight is None
    packed = cpu_decode.pack_skinny(linear.weight)
    with torch.inference_mode():
        for rows in (1, 3, most):
            x = torch.randn(1, rows, 576).to(torch.bfloat16)
            assert torch.equal(layer(x),
                               cpu_decode.skinny_linear(x, packed, 1536, linear.bias))
        x = torch.randn(1, most + 1, 576).to(torch.bfloat16)
        assert torch.equal(layer(x), onednn(x))
        # oneDNN on its packed weight: nn.Linear's values, within one unit in the last place
        # where AMX picks other kernels for it (tests/actors/test_cpu_linear.py)
        torch.testing.assert_close(layer(x), linear(x), rtol=torch.finfo(torch.bfloat16).eps,
                                   atol=1e-4)
    assert torch.equal(layer.weight, linear.weight)


def test_the_kernel_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("BATON_CPU_KERNELS", "0")
    cpu_decode.kernel.cache_clear()
    try:
        assert cpu_decode.kernel() is None
        assert cpu_decode.skinny_rows(torch.randn(64, 64).to(torch.bfloat16)) == 0
        with pytest.raises(RuntimeError, match="not available"):
            cpu_decode.skinny_linear(torch.randn(1, 64).to(torch.bfloat16),
                                     torch.zeros(16, 2, 4, 32, dtype=torch.bfloat16), 64)
    finally:
        monkeypatch.delenv("BATON_CPU_KERNELS")
        cpu_decode.kernel.cache_clear()
    assert cpu_decode.kernel() is not None


def step(rows_spec, n_kv=3, groups=3, d=64, bs=16, dtype=torch.bfloat16, seed=0,
         magnitudes=False):
    """A prepared step over a random cache: `rows_spec` is (context after the step, tokens run,
    draft tree or None) per row, each row on scattered blocks of its own. The same seed gives
    the same values in any dtype (drawn in bf16); `magnitudes`: every value (cached and new)
    replaced by its magnitude."""
    gen = torch.Generator().manual_seed(seed)
    spec = KVCacheSpec(num_layers=1, num_kv_heads=n_kv, head_dim=d, block_size=bs, dtype=dtype)
    cache = PagedKVCache(spec, num_blocks=96, device=torch.device("cpu"))
    for part in (cache.keys[0], cache.values[0]):
        part.copy_(torch.randn(part.shape, generator=gen).to(torch.bfloat16))
    free = torch.randperm(96, generator=gen).tolist()
    rows = []
    for ctx, n, tree in rows_spec:
        table = [free.pop() for _ in range((ctx + bs - 1) // bs)]
        rows.append(BatchRow(list(range(ctx)), ctx - n, n, table, n, tree))
    _, _, batch, _ = ModelRunner(None, cache, torch.device("cpu")).prepare(rows)
    t = sum(n for _, n, _ in rows_spec)
    q = (torch.randn(1, n_kv * groups, t, d, generator=gen) * 3).to(torch.bfloat16).to(dtype)
    k = torch.randn(1, n_kv, t, d, generator=gen).to(torch.bfloat16).to(dtype)
    if magnitudes:
        cache.values[0].abs_()
        return batch, q, k, k.abs()
    return batch, q, k, k.clone()


def attend(batch, q, k, v, kernel: bool, monkeypatch) -> torch.Tensor:
    layer = SimpleNamespace(layer_idx=0)
    with monkeypatch.context() as m:
        if not kernel:
            m.setattr(paged_attention.cpu_decode, "takes_decode_attention", lambda *_: False)
        with paged_attention.attention_batch(batch):
            out, _ = paged_attention.paged_attention_forward(layer, q, k, v, None)
    return out


TREE = DraftTree([11, 12, 13, 14, 15, 16], [-1, -1, 0, 0, 2, 1])


def on_kernel(amx: bool, d: int, monkeypatch) -> list[int]:
    """Route the torch path's calls of `decode_attention` to one kernel (AMX or AVX-512), or skip
    where that kernel does not take head dim `d` here; returns a list that counts the calls."""
    if amx and not cpu_decode.attention_on_amx(d):
        pytest.skip(f"no AMX here, or head dim {d} is not for the tiles")
    calls: list[int] = []
    real = cpu_decode.decode_attention
    monkeypatch.setattr(cpu_decode, "decode_attention",
                        lambda *a: calls.append(1) or real(*a, amx=amx))
    return calls


def within_bf16(got, want, spread) -> bool:
    """Within bf16 rounding of the float32 result: the output's own rounding and, since both
    kernels multiply V by the weights in bf16 (as GPU paged-attention kernels do), one bf16
    rounding of each weight, which moves an output by up to 2^-8 of the same attention over |V|
    (`spread`)."""
    bound = want.abs() * 2.0**-8 + 1e-5 + spread * 2.0**-8
    return bool(((got.float() - want).abs() <= bound).all())


KERNELS = pytest.mark.parametrize("amx", [False, True], ids=["avx512", "amx"])


@KERNELS
@pytest.mark.parametrize(("n_kv", "groups", "d"), [(3, 3, 64), (2, 1, 16), (1, 8, 128),
                                                   (2, 2, 48), (1, 2, 256)])
@pytest.mark.parametrize("rows_spec", [
    [(1, 1, None), (16, 1, None), (17, 1, None), (150, 1, None)],  # decode, block edges
    [(40, 1, None), (60, 5, None), (33, 7, TREE), (9, 9, None)],  # chain, tree, short prompt
], ids=["decode", "verify"])
def test_decode_attention_matches_the_torch_path(n_kv, groups, d, rows_spec, amx, monkeypatch):
    """The same prepared step through the kernel (bf16) and through torch's path in float32 on
    the same values: every output within bf16 rounding, for decode tokens, a chain, a draft tree
    under its ancestor mask beside them, and a short prompt with nothing cached."""
    seed = n_kv * 100 + d
    batch, q, k, v = step(rows_spec, n_kv, groups, d, seed=seed)
    calls = on_kernel(amx, d, monkeypatch)
    got = attend(batch, q, k, v, True, monkeypatch)
    assert calls and got.dtype == torch.bfloat16
    batch32, q32, k32, v32 = step(rows_spec, n_kv, groups, d, dtype=torch.float32, seed=seed)
    assert torch.equal(q32, q.float())
    want = attend(batch32, q32, k32, v32, True, monkeypatch)  # float32: torch's path
    spread = attend(*step(rows_spec, n_kv, groups, d, dtype=torch.float32, seed=seed,
                          magnitudes=True), True, monkeypatch)
    assert got.shape == want.shape
    assert within_bf16(got, want, spread)


@KERNELS
def test_blocks_that_are_not_sixteen_keys_attend_the_same(amx, monkeypatch):
    """Block size 12: a tile's sixteen keys span blocks (the AMX kernel copies them together)."""
    rows_spec = [(5, 1, None), (40, 1, None), (60, 5, None), (33, 7, TREE)]
    batch, q, k, v = step(rows_spec, bs=12, seed=5)
    calls = on_kernel(amx, 64, monkeypatch)
    got = attend(batch, q, k, v, True, monkeypatch)
    assert calls
    batch32, q32, k32, v32 = step(rows_spec, bs=12, dtype=torch.float32, seed=5)
    want = attend(batch32, q32, k32, v32, True, monkeypatch)
    spread = attend(*step(rows_spec, bs=12, dtype=torch.float32, seed=5, magnitudes=True), True,
                    monkeypatch)
    assert within_bf16(got, want, spread)


@KERNELS
def test_a_tokens_output_does_not_depend_on_what_shares_the_call(amx, monkeypatch):
    """Each token of a 16-token verify run (48 query heads: three AMX tiles), beside other
    sequences' decode tokens, gives the bits it gives attended alone: verify runs come out as
    decode steps would, so greedy speculation keeps its tokens."""
    on_kernel(amx, 64, monkeypatch)
    gen = torch.Generator().manual_seed(11)
    k = torch.randn(3, 64, 16, 64, generator=gen).to(torch.bfloat16)
    v = torch.randn(3, 64, 16, 64, generator=gen).to(torch.bfloat16)
    tables = torch.randperm(64, generator=gen)[:60].view(3, 20)
    run = 16
    rows = torch.tensor([0] * run + [1, 2])
    base = torch.tensor([200 - run] * run + [37, 290])
    bits = torch.tensor([(1 << (i + 1)) - 1 for i in range(run)] + [0, 0])
    q = torch.randn(len(rows), 9, 64, generator=gen).to(torch.bfloat16)
    assert_each_as_alone(q, k, v, tables, rows, base, bits)


@KERNELS
def test_a_draft_trees_tokens_attend_together_as_each_would_alone(amx, monkeypatch):
    """A verify run over a draft tree (root and six nodes of two branches, beside another
    sequence's chain and a decode token): its tokens share a tile where the kernel takes them
    together, each reading its own path past the shared keys, and each gives the bits it gives
    alone."""
    on_kernel(amx, 64, monkeypatch)
    gen = torch.Generator().manual_seed(12)
    k = torch.randn(3, 96, 16, 64, generator=gen).to(torch.bfloat16)
    v = torch.randn(3, 96, 16, 64, generator=gen).to(torch.bfloat16)
    tables = torch.randperm(96, generator=gen)[:90].view(3, 30)
    tree = [1] + [1 | 1 << (1 + i) | sum(1 << (1 + a) for a in ancestors(i)) for i in range(6)]
    chain = [(1 << (i + 1)) - 1 for i in range(5)]
    rows = torch.tensor([0] * len(tree) + [1] * len(chain) + [2])
    base = torch.tensor([301] * len(tree) + [77] * len(chain) + [450])
    bits = torch.tensor(tree + chain + [0])
    q = torch.randn(len(rows), 9, 64, generator=gen).to(torch.bfloat16)
    assert_each_as_alone(q, k, v, tables, rows, base, bits)


def assert_each_as_alone(q, k, v, tables, rows, base, bits) -> None:
    """Every query token of one call gets the bits it gets attended alone."""
    together = cpu_decode.decode_attention(q, k, v, tables, rows, base, bits, 0.125)
    for t in range(len(rows)):
        alone = cpu_decode.decode_attention(q[t:t + 1], k, v, tables, rows[t:t + 1],
                                            base[t:t + 1], bits[t:t + 1], 0.125)
        assert torch.equal(alone[0], together[t]), t


def ancestors(i: int) -> list[int]:
    """TREE's node i's ancestors (indices into TREE)."""
    found = []
    while TREE.parents[i] >= 0:
        i = TREE.parents[i]
        found.append(i)
    return found


@KERNELS
def test_a_tree_token_attends_as_the_decode_step_of_its_path(amx, monkeypatch):
    """A tree token sees its base and its ancestors at their tree slots, with gaps between them;
    once accepted they are moved to the chain they form and the next decode step reads them
    there. Both must give the same bits, or greedy tree speculation drifts from `none`'s tokens
    in bf16. (On AMX, summing the weights by tree slot differed in 3 of these 200 cases.)"""
    on_kernel(amx, 64, monkeypatch)
    bs, differ = 16, []
    for seed in range(200):
        gen = torch.Generator().manual_seed(seed)
        k = torch.randn(3, 64, bs, 64, generator=gen).to(torch.bfloat16)
        v = torch.randn(3, 64, bs, 64, generator=gen).to(torch.bfloat16)
        tables = torch.randperm(64, generator=gen)[:40].view(1, 40)
        base = int(torch.randint(1, 500, (1,), generator=gen))
        bits = int(torch.randint(1, 1 << 20, (1,), generator=gen)) | 0b101  # a gap at 1
        q = (torch.randn(1, 9, 64, generator=gen) * 3).to(torch.bfloat16)
        tree = cpu_decode.decode_attention(q, k, v, tables, torch.tensor([0]),
                                           torch.tensor([base]), torch.tensor([bits]), 0.125)
        # The accepted path as a chain: the keys it shows moved to base, base + 1, ...
        path = [base + i for i in range(32) if bits >> i & 1]
        kc, vc = k.clone(), v.clone()
        for m, j in enumerate(path):
            src, dst = tables[0, j // bs], tables[0, (base + m) // bs]
            kc[:, dst, (base + m) % bs] = k[:, src, j % bs]
            vc[:, dst, (base + m) % bs] = v[:, src, j % bs]
        decode = cpu_decode.decode_attention(q, kc, vc, tables, torch.tensor([0]),
                                             torch.tensor([base + len(path)]),
                                             torch.tensor([0]), 0.125)
        if not torch.equal(tree, decode):
            differ.append(seed)
    assert differ == []


@KERNELS
def test_one_key_gives_that_keys_value_exactly(amx, monkeypatch):
    batch, q, k, v = step([(1, 1, None)])
    on_kernel(amx, 64, monkeypatch)
    out = attend(batch, q, k, v, True, monkeypatch)  # [1, T, H, D]
    assert torch.equal(out[0, 0].view(3, 3, 64), v[0, :, 0].unsqueeze(1).expand(3, 3, 64))


def test_decode_attention_refuses_a_context_longer_than_its_table():
    k_cache = torch.zeros(1, 4, 16, 16, dtype=torch.bfloat16)
    q = torch.zeros(1, 1, 16, dtype=torch.bfloat16)
    tables, rows = torch.tensor([[0, 1]]), torch.tensor([0])
    with pytest.raises(RuntimeError, match="context length 33 out of the table"):
        cpu_decode.decode_attention(q, k_cache, k_cache, tables, rows, torch.tensor([33]),
                                    torch.tensor([0]), 0.25)
    with pytest.raises(RuntimeError, match="context length 34 out of the table"):  # key 33 again
        cpu_decode.decode_attention(q, k_cache, k_cache, tables, rows, torch.tensor([30]),
                                    torch.tensor([0b1000]), 0.25)
    assert not cpu_decode.takes_decode_attention(q.float(), k_cache)  # float32: torch's path


def test_a_bf16_engine_decodes_on_the_kernels_as_on_the_torch_path(monkeypatch):
    """The same greedy requests through one engine with the kernels on and off: the same tokens
    and logprobs within bf16 rounding, up to a near tie where the two paths may part."""
    from baton.actors.engine import Engine
    from baton.sampling import SamplingParams

    calls = []
    real = cpu_decode.decode_attention
    monkeypatch.setattr(cpu_decode, "decode_attention",
                        lambda *a: calls.append(1) or real(*a))
    engine = Engine("tiny:llama", dtype="bfloat16")
    assert any(getattr(m, "skinny_rows", 0) for m in engine.model.modules())
    # Short steps run each layer in one C++ call (attention on the kernel inside): count those.
    for layer in engine.runner.decode_step.layers:
        fused = layer.fused
        layer.fused = SimpleNamespace(
            forward=lambda *a, fused=fused: calls.append(1) or fused.forward(*a))
    prompts = [list(range(5, 40)), [3, 1, 4, 1, 5]]
    params = SamplingParams(max_tokens=10, ignore_eos=True, logprobs=5)
    on = engine.generate(prompts, params)
    assert calls, "decode steps did not reach the kernel"
    monkeypatch.setattr(paged_attention.cpu_decode, "takes_decode_attention", lambda *_: False)
    engine.runner.decode_step = None  # transformers' forward, on oneDNN linears
    for layer in engine.model.modules():
        if isinstance(layer, PackedLinear):
            layer.skinny_rows = 0
    calls.clear()
    off = engine.generate(prompts, params)
    assert not calls
    for a, b in zip(on, off, strict=True):
        parted = [i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=True))
                  if x != y]
        n = parted[0] if parted else len(a.token_ids)
        for i in range(n):
            assert abs(a.logprobs[i].logprob - b.logprobs[i].logprob) < 0.05
        if parted:  # the torch path's choice was within rounding of the kernels' best
            assert a.logprobs[n].top[b.token_ids[n]] > a.logprobs[n].logprob - 0.05


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_kernel_rmsnorm_computes_the_models_own_norm(arch):
    """Swapped norms give the transformers module's output up to one bf16 step (the mean is
    summed in another order), nearly always the same bits."""
    from baton.actors.cpu_norm import KernelRMSNorm, use_kernel_norms
    from baton.actors.tiny import tiny_model

    model = tiny_model(arch, torch.bfloat16, "eager")
    norms = {n: m for n, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")}
    for m in norms.values():
        m.weight.data.copy_(torch.randn(m.weight.shape))
    x = (torch.randn(2, 5, model.config.hidden_size) * 4).to(torch.bfloat16)
    with torch.inference_mode():
        want = {n: m(x[..., : m.weight.shape[0]]) for n, m in norms.items()}
        assert use_kernel_norms(model) == len(norms) > 0
        for name, module in model.named_modules():
            if name in norms:
                assert isinstance(module, KernelRMSNorm)
                got = module(x[..., : module.weight.shape[0]])
                step = want[name].float().abs() * 2.0**-7 + 1e-6
                assert ((got.float() - want[name].float()).abs() <= step).all()
                assert (got == want[name]).float().mean() > 0.97


def test_other_norms_and_float32_keep_their_modules():
    from baton.actors.cpu_norm import KernelRMSNorm, use_kernel_norms
    from baton.actors.tiny import tiny_model

    for arch, dtype in (("gemma", torch.bfloat16), ("llama", torch.float32)):
        model = tiny_model(arch, dtype, "eager")
        assert use_kernel_norms(model) == 0
        assert not any(isinstance(m, KernelRMSNorm) for m in model.modules())


def test_a_build_lock_left_by_a_killed_build_is_cleared_and_a_live_one_waited_for(tmp_path):
    """torch waits for a build's lock to go, forever: a process killed mid-build would otherwise
    hang every later engine start on the machine."""
    import os
    import threading
    import time

    cpu_decode.wait_for_build(tmp_path)  # no lock: nothing to wait for
    lock = tmp_path / "lock"
    lock.touch()
    threading.Timer(0.3, lock.unlink).start()  # a build under way finishes
    t0 = time.monotonic()
    cpu_decode.wait_for_build(tmp_path, poll=0.05)
    assert time.monotonic() - t0 >= 0.25 and not lock.exists()
    lock.touch()
    old = time.time() - cpu_decode.STALE_LOCK_SECONDS - 1
    os.utime(lock, (old, old))
    cpu_decode.wait_for_build(tmp_path, poll=0.05)
    assert not lock.exists()


def test_every_process_builds_with_the_environments_own_ninja(monkeypatch):
    """Two ninjas on one machine (a system one, the environment's) hash build commands apart
    since ninja 1.12: a process that ran the other would rebuild the kernels from scratch."""
    import os
    import shutil

    ninja = pytest.importorskip("ninja")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    cpu_decode._use_one_ninja()
    found = shutil.which("ninja")
    assert found is not None
    assert os.path.realpath(found) == os.path.realpath(os.path.join(ninja.BIN_DIR, "ninja"))
    assert os.environ["PATH"].split(os.pathsep)[1:] == ["/usr/bin", "/bin"]  # nothing else moved
    cpu_decode._use_one_ninja()  # once is enough
    assert os.environ["PATH"].count(os.pathsep) == 2


@pytest.mark.parametrize("hidden", [64, 72, 576])
def test_rms_norm_is_llamas_norm_on_any_width_and_a_row_does_not_depend_on_its_batch(hidden):
    """Widths that are not a multiple of the kernel's 16 lanes included (masked tails): each
    output within one bf16 step of transformers' formula, NaN and denormal inputs as torch
    rounds them, and a row's bits the same alone as among 17 rows."""
    torch.manual_seed(hidden)
    x = (torch.randn(17, hidden) * 3).to(torch.bfloat16)
    w = torch.randn(hidden).to(torch.bfloat16)
    eps = 1e-5
    got = cpu_decode.rms_norm(x, w, eps)
    xf = x.float()
    want = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(torch.bfloat16)
    step = want.float().abs() * 2.0**-7 + 1e-6
    assert ((got.float() - want.float()).abs() <= step).all()
    for r in (0, 9, 16):
        assert torch.equal(cpu_decode.rms_norm(x[r : r + 1], w, eps), got[r : r + 1])
    # Rounding to bf16 as torch does, also for a NaN row and a row of denormal-scale values.
    odd = torch.zeros(2, hidden)
    odd[0, 0] = float("nan")
    odd[1] = torch.linspace(1e-39, 5e-39, hidden)
    out = cpu_decode.rms_norm(odd.to(torch.bfloat16), torch.ones(hidden, dtype=torch.bfloat16),
                              1e-30)
    assert out[0].isnan().all() and torch.isfinite(out[1]).all() and (out[1] > 0).all()


@pytest.mark.parametrize("head_dim", [16, 40, 64, 128])
def test_rope_is_the_three_bf16_ops_of_transformers_bit_for_bit(head_dim):
    """x * cos + rotate_half(x) * sin in bf16 torch ops, for halves of 8 to 64 lanes (one
    partial chunk, a full one and a partial one, several full ones)."""
    torch.manual_seed(head_dim)
    tokens, heads = 5, 3
    x = (torch.randn(tokens, heads, head_dim) * 4).to(torch.bfloat16)
    angles = torch.rand(tokens, head_dim // 2) * 100
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(torch.bfloat16)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(torch.bfloat16)
    half = head_dim // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    want = x * cos[:, None] + rotated * sin[:, None]
    assert torch.equal(cpu_decode.rope(x, cos, sin), want)
