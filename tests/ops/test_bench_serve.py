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
from baton.ops.bench import serve, serve_targets
from baton.ops.bench.openloop import SLO, run_open_loop
from baton.ops.bench.transformers_serve import (
    StreamProgress,
    completion_body,
    serving_dir,
    stream_completion,
)
from baton.ops.bench.workload import BenchRequest


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


def _rates(attain: dict[float, float], tok_s: float) -> dict[float, dict]:
    return {r: {"attainment": a, "ttft_p50_s": 0.1, "ttft_p99_s": 0.2, "tpot_p50_s": 0.02,
                "tpot_p99_s": 0.03, "output_tok_s": tok_s} for r, a in attain.items()}


def test_report_states_slos_and_ratios(capsys):
    results = {"baton": _rates({0.5: 1.0, 1.0: 0.95, 2.0: 0.5}, 40.0),
               serve.PEER: _rates({0.5: 1.0, 1.0: 0.4}, 10.0)}
    overhead = {"router_ttft_ms_p50": 5.0, "router_ttft_ms_p99": 9.0, "direct_ttft_ms_p50": 4.0,
                "direct_ttft_ms_p99": 6.0, "overhead_ms_p50": 1.0, "overhead_ms_p99": 3.0}
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
