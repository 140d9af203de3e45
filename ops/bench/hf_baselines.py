"""transformers baselines for `baton bench engine`: `generate` one at a time, static batching,
and the continuous-batching manager behind `generate_batch`, timed per step with a streamer."""

from __future__ import annotations

import time

import torch
from transformers.generation.streamers import BaseStreamer

from baton.actors.model_source import ModelSource, load_tokenizer
from baton.ops.bench.workload import RequestTiming, SystemResult, Workload
from baton.stats import tpot


class StepClock(BaseStreamer):
    """Streamer noting when `generate` hands out each step's tokens."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    @property
    def steps(self) -> list[float]:  # the first put is the prompt
        return self.times[1:]


# -- transformers baselines -----------------------------------------------------------------------


def load_hf(source: ModelSource, dtype: torch.dtype):
    """(model, tokenizer) from the very source Baton's engine loads, with SDPA attention."""
    tokenizer = load_tokenizer(source)
    if source.kind == "tiny":
        from baton.actors.tiny import tiny_model

        return tiny_model(source.spec.split(":", 1)[1], dtype, "sdpa"), tokenizer
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype,
                                                 attn_implementation="sdpa")
    return model.eval(), tokenizer


def _pad_id(model) -> int:
    cfg = model.generation_config
    value = next((v for v in (cfg.pad_token_id, cfg.eos_token_id) if v is not None), 0)
    return value[0] if isinstance(value, list) else value


def _generate(model, ids: torch.Tensor, mask: torch.Tensor, n: int, clock: StepClock | None):
    # min_new_tokens == max_new_tokens: EOS is masked out, every row gets exactly n tokens.
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=_pad_id(model),
                              streamer=clock)


def warm_hf(model, wl: Workload) -> None:
    ids = torch.tensor([wl.requests[0].prompt_ids[:16]])
    _generate(model, ids, torch.ones_like(ids), 4, None)


def run_hf_generate(model, wl: Workload) -> SystemResult:
    """transformers `generate`, one request after another (batch 1)."""
    timings = []
    start = time.perf_counter()
    for req in wl.requests:
        ids = torch.tensor([req.prompt_ids])
        clock = StepClock()
        t0 = time.perf_counter()
        out = _generate(model, ids, torch.ones_like(ids), req.max_tokens, clock)
        n = out.shape[1] - ids.shape[1]
        timings.append(RequestTiming(clock.steps[0] - t0, _tpot(clock.steps[:n]), n))
    return SystemResult(timings, time.perf_counter() - start)


def run_hf_static_batch(model, wl: Workload) -> SystemResult:
    """transformers `generate` on all requests at once: one left-padded batch run to the longest."""
    width = max(len(r.prompt_ids) for r in wl.requests)
    ids = torch.full((len(wl.requests), width), _pad_id(model), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, req in enumerate(wl.requests):
        ids[i, width - len(req.prompt_ids):] = torch.tensor(req.prompt_ids)
        mask[i, width - len(req.prompt_ids):] = 1
    longest = wl.max_output_tokens
    clock = StepClock()
    t0 = time.perf_counter()
    out = _generate(model, ids, mask, longest, clock)
    wall = time.perf_counter() - t0
    steps = clock.steps
    # A request's tokens are ready at its own step n; later steps for its row are wasted work.
    timings = [RequestTiming(steps[0] - t0, _tpot(steps[: r.max_tokens]), r.max_tokens)
               for r in wl.requests]
    return SystemResult(timings, wall, {
        "batch_size": len(wl.requests),
        "max_new_tokens": longest,
        "generated_tokens": (out.shape[1] - width) * len(wl.requests),
        "tokens_counted": "each request's own max_tokens only; a row's steps past its length "
                          "are generated but not counted in output_tok_s",
        "ttft_is": "time to the batch's first generated step (the same for every request)",
    })


def run_hf_generate_batch(model, wl: Workload) -> SystemResult:
    """transformers continuous batching: `generate_batch`'s own manager and loop.

    `generate_batch` gives every request the same max_new_tokens; its manager takes one per
    request, so this drives the manager as `generate_batch` does (same workload hints, warmup
    before the clock starts) with each request's own length and EOS off.
    """
    from transformers import GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    gen_cfg = GenerationConfig(max_new_tokens=wl.max_output_tokens, do_sample=False,
                               eos_token_id=-1, pad_token_id=_pad_id(model))
    hints = WorkloadHints(max_prompt_length=max(len(r.prompt_ids) for r in wl.requests),
                          max_generated_length=wl.max_output_tokens,
                          num_requests=len(wl.requests))
    with model.continuous_batching_context_manager(
        generation_config=gen_cfg, block=True, timeout=5, workload_hints=hints
    ) as manager:
        t0 = time.perf_counter()
        for i, req in enumerate(wl.requests):
            manager.add_request(req.prompt_ids, request_id=f"r{i}", max_new_tokens=req.max_tokens,
                                record_timestamps=True, eos_token_id=-1)
        results = {}
        while len(results) < len(wl.requests):
            res = manager.get_result(timeout=1)
            if res is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching thread stopped early")
                continue
            if res.error is not None:
                raise RuntimeError(f"generate_batch request {res.request_id} failed: {res.error}")
            if res.is_finished():
                results[res.request_id] = res
        wall = time.perf_counter() - t0
    timings = []
    for i in range(len(wl.requests)):
        res = results[f"r{i}"]
        stamps = res.timestamps or []
        timings.append(RequestTiming(stamps[0] - res.created_time, _tpot(stamps),
                                     len(res.generated_tokens)))
    return SystemResult(timings, wall, {
        "api": "continuous_batching_context_manager + add_request (generate_batch's loop, "
               "per-request max_new_tokens)",
        "attn_implementation": model.config._attn_implementation,
    })


def _tpot(stamps: list[float]) -> float | None:
    """TPOT of a request whose tokens were ready at `stamps`."""
    return tpot(stamps[0], stamps[-1], len(stamps)) if stamps else None
