"""`baton bench serve`'s pieces that need neither Baton's cluster nor `transformers serve`: the
peer's SSE client against a small local server, the model-dir overlay, the SLO-deadline cut and
the report."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from rich.console import Console

from baton.errors import ConfigError, EngineError
from baton.ops.bench import router_time, serve, serve_targets, sweep
from baton.ops.bench.openloop import SLO, run_open_loop
from baton.ops.bench.transformers_serve import (
    StreamProgress,
    completion_body,
    serving_dir,
    stream_completion,
)
from baton.ops.bench.workload import BenchRequest, RequestTiming
from baton.router.metrics import RouterMetrics


def _event(text: str = "", finish: str | None = None, usage: dict | None = None) -> bytes:
    body = {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}
    if usage:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n".encode()


async def _sse_app(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if body["prompt"] == "refuse":
        return web.json_response({"error": "no"}, status=400)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    if body["prompt"] == "break":
        await resp.write(_event("a"))
        await resp.write(b'data: {"error": "worker died"}\n\n')
        return resp
    n = body["max_tokens"]
    await resp.write(b": keep-alive comment\n\n")
    for i in range(n - 1):  # one token decodes to no text: only the usage counts it
        await resp.write(_event(f" t{i}"))
    await resp.write(_event(finish="length", usage={"completion_tokens": n, "prompt_tokens": 7}))
    await resp.write(b"data: [DONE]\n\n")
    return resp


async def _collect(prompt: str, max_tokens: int) -> list[tuple[int, int | None, str | None]]:
    app = web.Application()
    app.router.add_post("/v1/completions", _sse_app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as session:
            body = completion_body("m", prompt, max_tokens)
            return [(p.tokens, p.prompt_tokens, p.finish_reason) async for p in
                    stream_completion(session, f"http://127.0.0.1:{port}", body)]
    finally:
        await runner.cleanup()


def test_sse_client_counts_tokens_and_takes_the_final_usage():
    seen = asyncio.run(_collect("hello", 4))
    assert [s[0] for s in seen] == [1, 2, 3, 4]
    assert seen[-1] == (4, 7, "length")


def test_sse_client_raises_on_refusal_and_mid_stream_errors():
    with pytest.raises(EngineError, match="400"):
        asyncio.run(_collect("refuse", 4))
    with pytest.raises(EngineError, match="worker died"):
        asyncio.run(_collect("break", 4))


def test_completion_body_asks_for_exactly_max_tokens_greedily():
    body = completion_body("m", "p", 12)
    gen = json.loads(body["generation_config"])
    assert body["stream"] and body["max_tokens"] == 12 and body["temperature"] == 0.0
    assert gen == {"max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False}
    assert "eos_token_id" not in gen


def test_serving_dir_adds_architectures_in_an_overlay_only_when_missing(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"w")
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    overlay = serving_dir(model, tmp_path / "scratch")
    assert overlay != model
    assert json.loads((overlay / "config.json").read_text())["architectures"] == [
        "LlamaForCausalLM"]
    assert (overlay / "model.safetensors").resolve() == model / "model.safetensors"
    assert json.loads((model / "config.json").read_text()) == {"model_type": "llama"}

    (model / "config.json").write_text(json.dumps({"architectures": ["X"]}))
    assert serving_dir(model, tmp_path / "scratch2") == model
    (model / "config.json").write_text(json.dumps({"model_type": "mystery"}))
    with pytest.raises(ConfigError, match="architectures"):
        serving_dir(model, tmp_path / "scratch3")


class _Fake(serve_targets.Target):
    """Streams one token every `gap` seconds."""

    name = "fake"

    def __init__(self, gap: float):
        super().__init__()
        self.gap = gap

    async def _stream(self, n: int) -> AsyncIterator[StreamProgress]:
        for k in range(1, n + 1):
            await asyncio.sleep(self.gap)
            yield StreamProgress(tokens=k, prompt_tokens=3)

    async def _run(self, requests, arrivals):
        return await run_open_loop(lambda i, r: self._watched(i, r, self._stream(r.max_tokens)),
                                   requests, arrivals)


def test_a_request_past_its_slo_deadline_is_cut_and_counted_a_miss(monkeypatch):
    monkeypatch.setattr(serve_targets, "CUT_GRACE_S", 0.0)
    reqs = [BenchRequest([1, 2, 3], 50)]
    fast = _Fake(0.0)
    fast.slo = SLO(ttft_s=0.2, tpot_s=0.01)
    (t,), _ = fast.run(reqs, [0.0])
    assert t.tokens == 50 and not fast.cut
    assert fast.checks == {"requests": 1, "short_outputs": 0, "prompt_token_mismatches": 0}

    slow = _Fake(0.05)
    slow.slo = SLO(ttft_s=0.2, tpot_s=0.001)
    (t,), _ = slow.run(reqs, [0.0])
    assert list(slow.cut) == [0] and 0 < t.tokens < 50
    assert not slow.slo.met(t)
    assert slow.checks["requests"] == 0  # cut requests are not counted as served


class _Speculating(_Fake):
    """Like `_Fake`, but the last chunk reports its forward passes, as Baton's does, for the
    requests with an even prompt."""

    async def _stream(self, n: int, even: bool = True) -> AsyncIterator[StreamProgress]:
        async for p in super()._stream(n):
            if p.tokens == n and even:
                p.forward_passes, p.draft_tokens, p.method = n // 2 + 1, n, "ngram"
            yield p

    async def _run(self, requests, arrivals):
        return await run_open_loop(
            lambda i, r: self._watched(i, r, self._stream(r.max_tokens,
                                                          r.prompt_ids[0] % 2 == 0)),
            requests, arrivals)


def test_each_requests_forward_passes_are_noted_for_the_replay():
    target = _Speculating(0.0)
    target.run([BenchRequest([2], 9), BenchRequest([1], 5), BenchRequest([4], 7)],
               [0.0, 0.0, 0.0])
    notes = target.notes()
    assert notes["forward_passes"] == [(5, 9), None, (4, 7)]
    assert notes["methods"] == ["ngram", None, "ngram"]
    assert "forward_passes" not in _Fake(0.0).notes()  # a peer that reports none


def _rates(attain: dict[float, float], tok_s: float) -> dict[float, dict]:
    return {r: {"attainment": a, "ttft_p50_s": 0.1, "ttft_p99_s": 0.2, "tpot_p50_s": 0.02,
                "tpot_p99_s": 0.03, "output_tok_s": tok_s} for r, a in attain.items()}


def test_report_states_slos_and_ratios(capsys):
    results = {"baton": _rates({0.5: 1.0, 1.0: 0.95, 2.0: 0.5}, 40.0),
               serve.PEER: _rates({0.5: 1.0, 1.0: 0.4}, 10.0)}
    phase = {"count": 30, "mean_ms": 0.8, "p50_ms": 0.7, "p99_ms": 2.0}
    overhead = {"router_ttft_ms_p50": 5.0, "router_ttft_ms_p99": 9.0, "direct_ttft_ms_p50": 4.0,
                "direct_ttft_ms_p99": 6.0, "overhead_ms_p50": 1.0, "overhead_ms_p99": 3.0,
                "ttft_difference_ms_p50": 1.0, "ttft_difference_ms_p99": 3.0,
                "in_router": {p: phase for p in router_time.PHASES},
                "in_router_over_sweep": None}
    checks = {n: {"requests": 3, "short_outputs": 0, "prompt_token_mismatches": 0}
              for n in results}
    report = serve._report("m", "bfloat16", [0, 1], 3, SLO(1.5, 0.25),
                           {"baton": (0.5, 0.05), serve.PEER: (0.4, 0.1)}, (3.0, 2.5), results,
                           overhead, checks, {"command": "transformers serve"})
    assert report["slo"]["ttft_s"] == 1.5 and report["slo"]["solo"]["baton"]["tpot_s"] == 0.05
    assert report["systems"]["baton"]["goodput_rps"] == 1.0
    assert report["systems"][serve.PEER]["goodput_rps"] == 0.5
    assert not report["systems"]["baton"]["goodput_is_lower_bound"]
    ratios = report["ratios"]
    assert ratios["goodput_vs_transformers_serve"] == 2.0
    assert ratios["router_overhead_ms_p50"] == 1.0 and ratios["router_overhead_ms_p99"] == 3.0
    assert ratios["tok_s_vs_transformers_serve_by_rate"] == {"0.5": 4.0, "1.0": 4.0}
    json.dumps(report)
    serve.print_report(report, Console(width=120))
    out = capsys.readouterr().out
    assert "goodput_vs_transformers_serve: 2.00 (target 2.0)" in out
    assert "router's own time, one at a time: added_ttft 0.70 / 2.00 ms p50/p99 (30)" in out


def test_workload_is_deterministic_with_distinct_prompts():
    class Tok:
        chat_template = None

        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return [sum(map(ord, w)) for w in text.split()]  # a token a word

    load = serve.LOAD
    a, b = load.requests(Tok(), 10, 3), load.requests(Tok(), 10, 3)
    assert a == b and len({tuple(r.prompt_ids) for r in a}) == 10
    for seed in (1, 2, 3):  # the same share of long prompts whatever the seed
        reqs = load.requests(Tok(), 10, seed)
        assert sum(len(r.prompt_ids) >= load.long_prompt[0] for r in reqs) == 3
    assert all(load.short_output[0] <= r.max_tokens <= load.long_output[1] for r in a)


def test_the_routers_own_time_is_read_off_its_metrics_between_two_scrapes():
    metrics = RouterMetrics("m")
    metrics.router_time("old", 0.2, 0.2)  # before the first scrape: not counted
    before = router_time.parse(metrics.render().decode())
    for admission in (0.00035,) * 6 + (0.0045,) * 4:  # p50 in (0.3, 0.4] ms, p99 in (4, 5]
        metrics.router_time("r", admission, 0.0001)
        metrics.relayed("r", 0.0001)
    got = router_time.summary(before, router_time.parse(metrics.render().decode()))
    assert got["admission"]["count"] == got["added_ttft"]["count"] == got["relay"]["count"] == 10
    assert 0.3 < got["admission"]["p50_ms"] <= 0.4 and 4.0 < got["admission"]["p99_ms"] <= 5.0
    assert got["admission"]["mean_ms"] == pytest.approx(0.6 * 0.35 + 0.4 * 4.5)
    assert 0.4 < got["added_ttft"]["p50_ms"] <= 0.5  # admission + 0.1 ms of relay
    assert got["relay"]["p99_ms"] <= 0.1


def test_quantile_of_an_empty_histogram_or_one_past_its_buckets():
    assert router_time.quantile(0.5, router_time.PhaseCounts()) is None
    h = router_time.PhaseCounts({0.001: 0.0, 0.01: 1.0, float("inf"): 4.0}, 40.0, 4.0)
    assert router_time.quantile(0.25, h) == pytest.approx(0.01)
    assert router_time.quantile(0.99, h) == 0.01  # past the last finite bound: that bound


class _MissesAtFirst:
    """Misses the TTFT SLO on its first `misses` runs, meets it after."""

    name = "peer"

    def __init__(self, misses: int):
        self.misses, self.runs = misses, 0

    def run(self, requests, arrivals):
        self.runs += 1
        ttft = 9.0 if self.runs <= self.misses else 0.1
        return [RequestTiming(ttft, 0.01, r.max_tokens) for r in requests], 1.0

    def notes(self):
        return {}


@pytest.mark.parametrize(("min_rate", "goodput"), [(0.03, 0.03125), (0.05, 0.0)])
def test_a_system_that_misses_every_rate_swept_is_tried_at_halved_rates(min_rate, goodput):
    reqs = [BenchRequest([1, 2, 3], 4)] * 3

    class Load:
        long_prompt = (100, 200)

        def requests(self, tokenizer, n, seed):
            return reqs[:n]

    peer, ok = _MissesAtFirst(3), _MissesAtFirst(0)
    systems = {"peer": peer, "ok": ok}
    slo = SLO(ttft_s=1.0, tpot_s=0.1)
    results = sweep.run(systems, None, Load(), 3, [0.25, 0.5], slo, 0, print)
    assert list(results["peer"]) == [0.25] and list(results["ok"]) == [0.25, 0.5]
    sweep.extend_down(systems, results, None, Load(), 3, slo, 0, print, min_rate)
    assert list(results["ok"]) == [0.25, 0.5]  # met the lowest rate: not run again
    assert sweep.systems_report(results)["peer"]["goodput_rps"] == goodput
    assert min(results["peer"]) >= min_rate
