"""`baton profile`: this machine's engine timed over a grid, for the planner to calibrate by.

Prefill: one prompt of each length alone, the step that computes it timed. Decode: a batch of
requests of one context length, prefilled first, then decode steps timed (mean: on a shared
machine the mean, not the median, is what a loaded run sees). Prompts are
random token ids, different per request, so the prefix cache never shortens a prompt. Each
prompt length and batch size runs once untimed first (a GPU compiles kernels, plans its libraries
and captures CUDA graphs per new shape). On a GPU
machine (`--device cuda`) the same grid measures the GPU (name it with `--gpu` so the planner
calibrates that catalog entry).
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence

from baton.actors.engine import Engine
from baton.cluster.planner.profile import Profile
from baton.engine_config import EngineConfig
from baton.errors import EngineError
from baton.ops.bench.machine import machine_info
from baton.sampling import SamplingParams

PREFILL_LENS = (16, 64, 256, 1024)
BATCHES = (1, 4, 8)
CONTEXTS = (16, 256, 1024)
DECODE_STEPS = 6
MODEL_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "intermediate_size", "vocab_size", "tie_word_embeddings",
              "num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size")


def _prompt(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


def _drain(engine: Engine) -> None:
    while engine.has_unfinished():
        engine.step()


def measure(model: str = "default", dtype: str = "bfloat16", threads: int = 1,
            device: str = "cpu", gpu: str | None = None,
            prefill_lens: Sequence[int] = PREFILL_LENS, batches: Sequence[int] = BATCHES,
            contexts: Sequence[int] = CONTEXTS, decode_steps: int = DECODE_STEPS,
            repeats: int = 1, kv_cache_memory: int | None = None,
            say: Callable[[str], None] | None = None) -> Profile:
    """Time the engine over the grid (each prefill `repeats` times, each decode batch over
    `decode_steps` steps; means kept); returns the profile (not yet saved). `kv_cache_memory`
    (bytes) sizes the grid engine's cache: a GPU grid's largest batch at its longest context
    needs more than a worker's default."""
    budget = max(max(prefill_lens), max(batches))
    extra = {"kv_cache_memory": kv_cache_memory} if kv_cache_memory else {}
    engine = Engine(model=model, dtype=dtype, device=device, num_threads=threads,
                    max_num_batched_tokens=budget, max_num_seqs=max(batches),
                    enable_prefix_caching=False, **extra)
    cfg = engine.model.config.get_text_config().to_dict()
    rng = random.Random(0)
    vocab = engine.vocab_size
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    engine.generate([_prompt(rng, vocab, 16)], one)  # warm up
    prefill = []
    for n in prefill_lens:
        # Untimed first: a GPU compiles kernels and plans its libraries per new shape.
        engine.generate([_prompt(rng, vocab, n)], one)
        times = []
        for _ in range(repeats):
            engine.add_request(_prompt(rng, vocab, n), one)
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
            _drain(engine)
        prefill.append((n, statistics.fmean(times)))
        if say:
            say(f"prefill {n:5d} tokens: {prefill[-1][1] * 1000:.1f} ms")
    decode = []
    for ctx in contexts:
        for b in batches:
            # The first prompts decode while the last ones prefill (a step takes `budget`
            # tokens): every request must outlast those steps, or the timed steps run fewer.
            prefill_steps = -(-b * ctx // budget) + b
            params = SamplingParams(max_tokens=prefill_steps + decode_steps + 2,
                                    ignore_eos=True)
            for _ in range(b):
                engine.add_request(_prompt(rng, vocab, ctx), params)
            while engine.num_waiting or any(s.num_uncomputed_tokens > 1
                                              for s in engine.scheduler.running):
                engine.step()
            engine.step()  # untimed: a GPU captures this batch size's CUDA graph here
            times = []
            for _ in range(decode_steps):
                if len(engine.scheduler.running) != b:
                    raise EngineError(f"profile: a decode step of batch {b} ran "
                                      f"{len(engine.scheduler.running)} requests")
                t0 = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - t0)
            for seq in list(engine.scheduler.running):
                engine.abort(seq.request_id)
            _drain(engine)
            decode.append((b, ctx, statistics.fmean(times)))
            if say:
                say(f"decode batch {b:3d} x {ctx:5d} context: {decode[-1][2] * 1000:.1f} ms")
    # What a worker's engine (default options) would hold, not this grid's engine.
    kv_memory = EngineConfig().kv_cache_memory
    return Profile(device=gpu or ("cpu" if device == "cpu" else device), model=model,
                   model_config={k: cfg[k] for k in MODEL_KEYS if cfg.get(k) is not None},
                   dtype=dtype, threads=threads, kv_cache_memory=float(kv_memory),
                   max_num_batched_tokens=EngineConfig().max_num_batched_tokens,
                   prefill=prefill, decode=decode,
                   machine=machine_info(threads))
