"""MoE expert offload through the engine: with only two experts' worth of device memory, every
tiny MoE architecture, policy and tier gives the all-resident model's greedy tokens and logits
(float32, exactly), stays inside its budget and counts every expert use once; bad configs fail
naming the option."""

from __future__ import annotations

import threading

import pytest
import torch

from baton.actors.engine import Engine
from baton.actors.expert_cache import ExpertCache
from baton.actors.expert_cache_aio import AioExpertCache
from baton.actors.expert_policies import LFUPolicy, LRUPolicy
from baton.actors.expert_store import HostStore
from baton.actors.moe_experts import SKINNY
from baton.actors.moe_offload import moe_layers
from baton.actors.tiny import MOE_ARCHS, tiny_model
from baton.engine_config import MOE_POLICIES
from baton.errors import ConfigError
from baton.kernels import cpu_decode
from baton.kernels.dispatch import force_backend
from baton.ops.expert_traces import train_experts
from baton.sampling import SamplingParams
from tests.conftest import assert_no_leaks, wait_until

PROMPTS = [list(b"The quick brown fox jumps over the lazy dog. " * 2), list(b"MoE!")]
MAX_TOKENS = 10
TIERS = ("host", "disk")
# Every policy a model with a router per layer runs (`pregate` needs a pre-gated checkpoint: its
# tests are in test_pregate.py).
PER_LAYER_POLICIES = tuple(p for p in MOE_POLICIES if p != "pregate")


def _expert_bytes(arch: str) -> int:
    experts = moe_layers(tiny_model(arch))[0].experts
    return (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()) * 4


def _generate(engine: Engine, check=lambda: None) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens of PROMPTS (batched together) and the logits of every step, in order;
    `check()` runs after every step."""
    logits: list[torch.Tensor] = []
    hook = engine.model.lm_head.register_forward_hook(
        lambda _m, _i, out: logits.append(out.detach().clone()))
    ids = [engine.add_request(p, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
           for p in PROMPTS]
    done = {}
    try:
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.token_ids
            check()
    finally:
        hook.remove()
    assert_no_leaks(engine)
    return [done[i] for i in ids], logits


@pytest.fixture(scope="module", autouse=True)
def _keep_thread_count():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # engines here pin one thread; later modules get theirs back


def _engine(model: str, **options) -> Engine:
    # No speculation: its start-up calibration would only add forward passes to every test.
    # One thread: tiny matmuls gain nothing from two, and lose much on a loaded machine.
    return Engine(model, dtype="float32", methods=["none"], num_threads=1, **options)


_REFERENCES: dict[str, tuple[list[list[int]], list[torch.Tensor]]] = {}


@pytest.fixture(scope="module")
def predictor_of(tmp_path_factory):
    """`predictor_of(arch)`: options naming a routing predictor trained (briefly) on `tiny:arch`
    when `policy` is 'learned', else none."""
    made: dict[str, str] = {}

    def options(arch: str, policy: str) -> dict[str, str]:
        if policy != "learned":
            return {}
        if arch not in made:
            path = tmp_path_factory.mktemp("predictors") / f"{arch}.safetensors"
            train_experts(f"tiny:{arch}", path, tokens=300, max_tokens=4, dtype="float32",
                          threads=1)
            made[arch] = str(path)
        return {"predictor": made[arch]}

    return options


def _reference(arch: str):
    if arch not in _REFERENCES:
        _REFERENCES[arch] = _generate(_engine(f"tiny:{arch}"))
    return _REFERENCES[arch]


def _count_expert_uses(engine: Engine) -> list[int]:
    """One counter, bumped by the number of distinct experts each MoE layer call routes to."""
    uses = [0]

    def count(_m, _i, out):
        uses[0] += torch.unique(out[2]).numel()  # routers return (logits, weights, indices)

    for layer in moe_layers(engine.model):
        layer.router.register_forward_hook(count)
    return uses


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("policy", PER_LAYER_POLICIES)
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_two_resident_experts_give_the_all_resident_output(arch, policy, tier, tmp_path,
                                                          predictor_of):
    tokens, logits = _reference(arch)
    budget = 2 * _expert_bytes(arch) + 1
    engine = _engine(f"tiny:{arch}", moe_offload={
        "budget": budget, "policy": policy, "tier": tier, **predictor_of(arch, policy),
        **({"dir": str(tmp_path)} if tier == "disk" else {})})
    moe = engine.moe
    assert moe is not None
    cache = moe.cache
    uses = _count_expert_uses(engine)
    # The model keeps no expert weights: only the cache's two slots hold any.
    names = [name for name, _ in engine.model.named_parameters()]
    assert not [n for n in names if n.endswith(("gate_up_proj", "down_proj"))]
    assert any(n.endswith("router.weight") or n.endswith("gate.weight") for n in names)
    assert cache.gate_up.nbytes + cache.down.nbytes == cache.budget_bytes <= budget
    # On a CPU the disk tier's reads are the forward's own (native AIO) where the system has it.
    assert isinstance(cache, AioExpertCache) == (tier == "disk" and moe.store.async_reads)
    if tier == "disk":
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            f"layer_{layer.index}.safetensors" for layer in moe.layers]

    def within_budget():
        assert len(cache.resident()) * cache.expert_bytes <= budget

    before = engine.expert_cache_stats()  # the engine's own start-up passes count too
    assert before is not None
    got_tokens, got_logits = _generate(engine, within_budget)
    assert got_tokens == tokens
    assert len(got_logits) == len(logits)
    for got, want in zip(got_logits, logits, strict=True):
        assert torch.equal(got, want)
    stats = engine.expert_cache_stats()
    assert stats is not None
    assert (stats["hits"] - before["hits"]) + (stats["misses"] - before["misses"]) == uses[0] > 0
    assert stats["misses"] > before["misses"]  # 2 of 24 experts resident: it had to load
    assert stats["bytes_loaded"] == (stats["misses"] + stats["prefetches_issued"]) * \
        cache.expert_bytes
    moe.close()


@pytest.mark.skipif(cpu_decode.kernel() is None, reason="Baton's CPU kernels are not built here")
@pytest.mark.parametrize("tier", TIERS)
def test_bf16_offload_gives_the_resident_bits_on_the_skinny_kernel(tier, tmp_path):
    def engine(**options) -> Engine:
        return Engine("tiny:mixtral", dtype="bfloat16", methods=["none"], num_threads=1,
                      **options)

    resident = engine()
    assert all(getattr(layer.experts, SKINNY, 0) for layer in moe_layers(resident.model))
    tokens, logits = _generate(resident)
    offloaded = engine(moe_offload={  # two bf16 experts
        "budget": _expert_bytes("mixtral") + 1, "policy": "lru", "tier": tier,
        **({"dir": str(tmp_path)} if tier == "disk" else {})})
    assert offloaded.moe is not None and offloaded.moe.cache.capacity == 2
    assert all(getattr(layer.experts, SKINNY, 0) for layer in offloaded.moe.layers)
    got_tokens, got_logits = _generate(offloaded)
    assert got_tokens == tokens
    assert all(torch.equal(a, b) for a, b in zip(got_logits, logits, strict=True))
    offloaded.moe.close()


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_offload_on_the_grouped_kernel_gives_the_resident_bits(arch):
    """Where the resident model runs the grouped GEMM (CUDA; here Triton's interpreter), the
    offloaded one runs the same kernel over the cache's slots, a layer's experts in parts of two:
    the same logits, bit for bit (per-expert matmuls differ in the last bits, and in bf16 on a
    GPU that flipped greedy tokens)."""
    with force_backend("triton"):
        resident = _engine(f"tiny:{arch}")
        tokens, logits = _generate(resident)
        offloaded = _engine(f"tiny:{arch}", moe_offload={
            "budget": 2 * _expert_bytes(arch) + 1, "policy": "lookahead", "tier": "host"})
        assert offloaded.moe is not None and offloaded.moe.cache.capacity == 2
        got_tokens, got_logits = _generate(offloaded)
        offloaded.moe.close()
    assert got_tokens == tokens
    assert len(got_logits) == len(logits)
    assert all(torch.equal(a, b) for a, b in zip(got_logits, logits, strict=True))


def test_lookahead_prefetches_experts_the_next_layer_uses():
    engine = _engine("tiny:mixtral", moe_offload={"budget": 0.5, "policy": "lookahead"})
    uses = _count_expert_uses(engine)
    _generate(engine)
    stats = engine.expert_cache_stats()
    assert stats is not None
    assert stats["prefetches_issued"] > 0
    assert stats["hits"] > 0 and stats["hits"] + stats["misses"] == uses[0]
    assert stats["prefetches_used"] > 0 and stats["prefetch_precision"] > 0
    assert stats["prefetch_recall"] == stats["prefetches_used"] / (stats["hits"] + stats["misses"])
    assert engine.moe is not None
    engine.moe.close()


def test_lookahead_predicts_with_the_next_layers_router():
    engine = _engine("tiny:mixtral", moe_offload={"budget": 0.5, "policy": "lookahead"})
    layers = moe_layers(engine.model)
    hidden = torch.randn(3, engine.model.config.hidden_size,
                         generator=torch.Generator().manual_seed(0))
    first, second, last = (layer.index for layer in layers)
    moe = engine.moe
    assert moe is not None
    with torch.no_grad():
        want = set(layers[1].router(hidden)[2].flatten().tolist())
        predicted = moe.policy.predict(first, hidden)
        assert predicted and {layer for layer, _ in predicted} == {second}
        # Every expert a token's router picks comes first; the best others fill top-k plus one.
        assert {e for _, e in predicted[: len(want)]} == want
        top_k = engine.model.config.num_experts_per_tok
        assert len(predicted) == max(len(want), min(top_k + 1, moe.store.num_experts))
        assert moe.policy.predict(last, hidden) == []
    moe.close()


def test_lru_evicts_the_least_recently_used_expert():
    lru = LRUPolicy()
    for key in [(0, 0), (0, 1), (0, 2)]:
        lru.insert(key)
    lru.touch((0, 0))
    assert lru.victim([(0, 0), (0, 1), (0, 2)]) == (0, 1)
    assert lru.victim([(0, 0), (0, 2)]) == (0, 2)  # only evictable ones are candidates


def test_lfu_evicts_the_least_used_expert_and_remembers_counts_across_eviction():
    lfu = LFUPolicy()
    for key, uses in [((0, 0), 3), ((0, 1), 1), ((0, 2), 2)]:
        lfu.insert(key)
        for _ in range(uses):
            lfu.touch(key)
    assert lfu.victim([(0, 0), (0, 1), (0, 2)]) == (0, 1)
    lfu.forget((0, 0))
    lfu.insert((0, 0))  # back again: its three uses still count
    lfu.insert((0, 3))
    lfu.touch((0, 3))
    assert lfu.victim([(0, 0), (0, 2), (0, 3)]) == (0, 3)  # 1 use against 3 and 2


class GatedHostStore(HostStore):
    """A fake slow store: reading expert `slow` blocks until `gate` is set; with `fail_once` that
    first read then raises, as a failing disk would."""

    def __init__(self, layers, slow, fail_once=False):
        super().__init__(layers, pin=False)
        self.slow = slow
        self.gate = threading.Event()
        self.fail_once = fail_once

    def read(self, layer, expert):
        if (layer, expert) == self.slow:
            assert self.gate.wait(30), "the test never opened the gate"
            if self.fail_once:
                self.fail_once = False
                raise OSError("fake read failure")
        return super().read(layer, expert)


@pytest.mark.parametrize("prefetch_fails", [False, True])
def test_a_forward_waits_for_an_in_flight_prefetch_and_reads_its_weights(prefetch_fails):
    gen = torch.Generator().manual_seed(0)
    layers = {0: (torch.randn(4, 6, 5, generator=gen), torch.randn(4, 5, 3, generator=gen))}
    store = GatedHostStore(layers, slow=(0, 2), fail_once=prefetch_fails)
    cache = ExpertCache(store, capacity=2, device=torch.device("cpu"), policy=LRUPolicy())
    cache.gate_up.fill_(float("nan"))
    cache.prefetch([(0, 2)])
    wait_until(lambda: cache.stats.prefetches_issued == 1, what="the loader took the prefetch")
    slots: list[int] = []
    forward = threading.Thread(target=lambda: slots.extend(cache.acquire(0, [2])))
    forward.start()
    wait_until(lambda: cache.stats.hits == 1, what="the forward found the expert in flight")
    forward.join(timeout=0.5)  # the load cannot finish while the gate is shut
    assert forward.is_alive(), "acquire returned before the expert was loaded"
    store.gate.set()
    forward.join(timeout=30)
    [slot] = slots
    assert torch.equal(cache.gate_up[slot], layers[0][0][2])
    assert torch.equal(cache.down[slot], layers[0][1][2])
    assert cache.stats.prefetches_used == 1 and cache.stats.misses == 0
    cache.release([slot])
    # The loader survives a failed read: the next prefetch still lands.
    cache.prefetch([(0, 3)])
    wait_until(lambda: (0, 3) in cache.resident() and cache.stats.bytes_loaded >= 2 *
               cache.expert_bytes, what="the second prefetch")
    cache.close()


@pytest.mark.gpu
@pytest.mark.parametrize("policy", PER_LAYER_POLICIES)
def test_offload_on_cuda_gives_the_resident_tokens(policy, predictor_of):
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]]
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    resident = _engine("tiny:mixtral", device="cuda").generate(prompts, params)
    engine = _engine("tiny:mixtral", device="cuda",
                     moe_offload={"budget": 0.25, "policy": policy,
                                  **predictor_of("mixtral", policy)})
    moe = engine.moe
    assert moe is not None and isinstance(moe.store, HostStore) and moe.store.pinned
    offloaded = engine.generate(prompts, params)
    assert [o.token_ids for o in offloaded] == [o.token_ids for o in resident]
    stats = engine.expert_cache_stats()
    assert stats is not None and stats["misses"] > 0
    if policy in ("lookahead", "trace", "learned"):
        assert stats["prefetches_issued"] > 0
    moe.close()


@pytest.mark.parametrize(("model", "offload", "names"), [
    ("tiny:mixtral", {"budget": 100}, "moe_offload.budget"),
    ("tiny:mixtral", {"budget": 0.01}, "moe_offload.budget"),
    ("tiny:mixtral", {"budget": 0}, "moe_offload.budget"),
    ("tiny:mixtral", {"budget": 0.5, "policy": "mru"}, "moe_offload.policy"),
    ("tiny:mixtral", {"budget": 0.5, "tier": "ssd"}, "moe_offload.tier"),
    ("tiny:mixtral", {"budget": 0.5, "speed": 1}, "moe_offload.speed"),
    ("tiny:mixtral", {"budget": 0.5, "policy": "learned"}, "moe_offload.predictor"),
    ("tiny:mixtral", {"budget": 0.5, "policy": "pregate"}, "moe_offload.policy"),
    ("tiny:mixtral", {"budget": 0.5, "predictor": "p.safetensors"}, "moe_offload.predictor"),
    ("tiny:mixtral", {"budget": 0.5, "policy": "learned", "predictor": "/nonexistent"},
     "moe_offload.predictor"),
    ("tiny:llama", {"budget": 0.5}, "moe_offload"),
])
def test_bad_offload_configs_fail_naming_the_option(model, offload, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        _engine(model, moe_offload=offload)


def test_a_dense_model_with_offload_says_it_has_no_experts():
    with pytest.raises(ConfigError, match="no Mixture-of-Experts layers"):
        _engine("tiny:llama", moe_offload={"budget": 0.5})
