"""Request handling on a tiny model: errors, abort, seeds, stop strings, logprobs, streaming."""

from __future__ import annotations

import time

import pytest

import baton.actors.engine as engine_module
from baton.actors.engine import Engine
from baton.errors import (
    ConfigError,
    ContextLengthError,
    InvalidRequestError,
    RequestNotFoundError,
)
from baton.sampling import SamplingParams
from tests.conftest import assert_no_leaks, run_to_completion


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine("tiny:llama", dtype="float32", max_model_len=256, num_kv_blocks=64)



@pytest.mark.parametrize(
    ("prompt", "params", "error", "says"),
    [
        ("", {}, InvalidRequestError, "empty"),
        ([], {}, InvalidRequestError, "non-empty"),
        ([1, 2, 999999], {}, InvalidRequestError, "token ids"),
        ("hi", {"max_tokens": 0}, InvalidRequestError, "max_tokens"),
        ("hi", {"max_tokens": -3}, InvalidRequestError, "max_tokens"),
        ("hi", {"temperature": -0.5}, InvalidRequestError, "temperature"),
        ("hi", {"temperature": float("nan")}, InvalidRequestError, "temperature"),
        ("hi", {"top_p": 0.0}, InvalidRequestError, "top_p"),
        ("hi", {"top_p": 1.5}, InvalidRequestError, "top_p"),
        ("hi", {"top_k": -1}, InvalidRequestError, "top_k"),
        ("hi", {"seed": -1}, InvalidRequestError, "seed"),
        ("hi", {"stop": [""]}, InvalidRequestError, "stop"),
        ("hi", {"logprobs": 99}, InvalidRequestError, "logprobs"),
        ("x" * 200, {"max_tokens": 100}, ContextLengthError, "context"),
    ],
)
def test_bad_request_is_rejected_and_others_keep_running(engine, prompt, params, error, says):
    good = engine.add_request("steady", SamplingParams(max_tokens=6))
    with pytest.raises(error, match=says):
        engine.add_request(prompt, SamplingParams(**params))
    final = run_to_completion(engine)
    assert list(final) == [good]  # the refused request left nothing behind to run
    assert final[good].finish_reason == "length" and len(final[good].token_ids) == 6


def test_request_larger_than_the_whole_kv_cache_is_rejected():
    small = Engine("tiny:llama", dtype="float32", num_kv_blocks=4, block_size=16)
    with pytest.raises(ContextLengthError, match="KV cache"):
        small.add_request([1] * 60, SamplingParams(max_tokens=10))
    assert_no_leaks(small)


def test_bad_engine_options_raise_config_errors():
    with pytest.raises(ConfigError, match="dtype"):
        Engine("tiny:llama", dtype="int3")
    with pytest.raises(ConfigError, match="unknown engine option"):
        Engine("tiny:llama", num_blockz=3)
    with pytest.raises(ConfigError, match="block_size"):
        Engine("tiny:llama", block_size=0)


def test_duplicate_request_id_is_rejected(engine):
    engine.add_request("a", SamplingParams(max_tokens=2), request_id="same")
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("b", SamplingParams(max_tokens=2), request_id="same")
    run_to_completion(engine)


def test_abort_frees_blocks_and_reports_abort(engine):
    keep = engine.add_request("keep going", SamplingParams(max_tokens=12, ignore_eos=True))
    gone = engine.add_request("x" * 60, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    engine.abort(gone)
    assert_no_leaks(engine)
    final = run_to_completion(engine)
    assert final[gone].finish_reason == "abort"
    assert final[keep].finish_reason == "length" and len(final[keep].token_ids) == 12
    with pytest.raises(RequestNotFoundError):
        engine.abort(gone)


def test_abort_while_waiting(engine):
    rid = engine.add_request("never scheduled", SamplingParams(max_tokens=5))
    engine.abort(rid)
    assert run_to_completion(engine)[rid].finish_reason == "abort"


def test_failed_step_fails_its_requests_and_engine_keeps_serving(engine, monkeypatch):
    rid = engine.add_request("boom", SamplingParams(max_tokens=4))
    real_run = engine.runner.run

    def broken(*_args, **_kwargs):  # whatever the runner is asked to run
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "run", broken)
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [(rid, "error")]
    assert "device lost" in outs[0].error
    assert_no_leaks(engine)
    monkeypatch.setattr(engine.runner, "run", real_run)
    assert engine.generate(["after"], SamplingParams(max_tokens=3))[0].finish_reason == "length"


def test_a_failure_choosing_a_steps_tokens_fails_its_requests_and_engine_keeps_serving(
        engine, monkeypatch):
    """Past the forward (sampling, stop checks), a failure ends the step's requests with the
    error, frees their blocks, and the engine thread goes on (it once died there, and every
    later call on the worker waited for good)."""
    rid = engine.add_request("boom", SamplingParams(max_tokens=4, temperature=0.7))

    def broken(*_args, **_kwargs):
        raise RuntimeError("sampler broke")

    monkeypatch.setattr(engine_module, "sample", broken)
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [(rid, "error")]
    assert "sampler broke" in outs[0].error
    assert_no_leaks(engine)
    monkeypatch.undo()
    assert engine.generate(["after"], SamplingParams(max_tokens=3))[0].finish_reason == "length"


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-30])
def test_a_temperature_near_zero_samples_the_argmax(engine, temperature):
    """Below float32's smallest normal number a temperature rounds to 0, and logits divided by
    it overflowed to NaN probabilities; such a request now gets the greedy tokens, as its
    batch neighbours get theirs."""
    greedy = engine.generate(["near zero"], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    neighbour = SamplingParams(max_tokens=8, temperature=1.0, seed=3, ignore_eos=True)
    alone = engine.generate(["a neighbour"], neighbour)[0]
    cold_id = engine.add_request("near zero", SamplingParams(
        max_tokens=8, temperature=temperature, seed=1, ignore_eos=True))
    warm_id = engine.add_request("a neighbour", neighbour)
    final = run_to_completion(engine)
    cold, warm = final[cold_id], final[warm_id]
    assert cold.token_ids == greedy.token_ids and cold.finish_reason == "length"
    assert warm.token_ids == alone.token_ids
    assert_no_leaks(engine)


def test_seed_reproduces_and_different_seeds_differ(engine):
    p = SamplingParams(max_tokens=24, temperature=1.0, seed=123, ignore_eos=True)
    a = engine.generate(["sample me"], p)[0].token_ids
    # Same seed, now sharing its batch with other sampled requests.
    noise = SamplingParams(max_tokens=24, temperature=1.0, ignore_eos=True)
    engine.add_request("other", noise)
    b = engine.generate(["sample me"], p)[0].token_ids
    c = engine.generate(["sample me"], SamplingParams(max_tokens=24, temperature=1.0,
                                                      seed=124, ignore_eos=True))[0].token_ids
    run_to_completion(engine)
    assert a == b
    assert a != c


def test_top_k_one_is_greedy(engine):
    greedy = engine.generate(["abc"], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    topk = engine.generate(["abc"], SamplingParams(max_tokens=10, temperature=0.9, top_k=1,
                                                   seed=5, ignore_eos=True))[0]
    assert topk.token_ids == greedy.token_ids


def test_stop_string_cuts_text_and_streams_nothing_past_it(engine):
    free = engine.generate(["stop test"], SamplingParams(max_tokens=40, ignore_eos=True))[0]
    text = free.text
    assert len(text) > 8
    stop = text[5:8]
    deltas = []
    for out in engine.stream("stop test", SamplingParams(max_tokens=40, stop=[stop],
                                                           ignore_eos=True)):
        deltas.append(out.delta_text)
    assert out.finish_reason == "stop"
    assert out.text == text[: text.index(stop)]
    assert "".join(deltas) == out.text


def test_stop_token_ids_and_eos(engine):
    free = engine.generate(["tok"], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    target = free.token_ids[3]
    out = engine.generate(["tok"], SamplingParams(max_tokens=10, stop_token_ids=[target],
                                                  ignore_eos=True))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == free.token_ids[: free.token_ids.index(target) + 1]


def test_logprobs_are_returned_per_token(engine):
    out = engine.generate(["lp"], SamplingParams(max_tokens=5, logprobs=3, ignore_eos=True))[0]
    assert out.logprobs is not None and len(out.logprobs) == 5
    for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert lp.token_id == tok
        assert lp.logprob <= 0
        assert len(lp.top) == 3
        # Greedy picks the likeliest token, so it heads the top list.
        assert max(lp.top, key=lp.top.get) == tok


def test_streamed_deltas_add_up_to_final_text(engine):
    outs = list(engine.stream("stream me", SamplingParams(max_tokens=30, ignore_eos=True)))
    assert outs[-1].finished
    assert "".join(o.delta_text for o in outs) == outs[-1].text
    assert sum(len(o.delta_token_ids) for o in outs) == len(outs[-1].token_ids) == 30


def test_metrics_time_the_first_token_and_the_ones_after_it(engine):
    """TTFT and TPOT agree with when the caller saw the tokens arrive."""
    before = time.monotonic()
    seen: list[float] = []  # when each output reached the caller
    firsts: list[float | None] = []  # the request's first_token timestamp at that moment
    for out in engine.stream("m", SamplingParams(max_tokens=7, ignore_eos=True)):
        seen.append(time.monotonic())
        firsts.append(out.metrics.first_token)
    assert out.finish_reason == "length" and len(seen) == 7
    m = out.metrics
    assert m.num_prompt_tokens == 1
    assert before <= m.arrival <= m.first_scheduled <= m.first_token <= seen[0]
    assert firsts == [m.first_token] * 7  # stamped with the first token, never moved
    assert seen[-2] <= m.finished <= seen[-1]  # stamped with the last token
    assert m.ttft is not None and 0 < m.ttft <= seen[0] - before
    # Six tokens after the first came between the first one's arrival and the end.
    tpot = m.tpot(7)
    assert tpot is not None and (seen[-2] - seen[0]) / 6 <= tpot <= (seen[-1] - before) / 6
    single = engine.generate(["m"], SamplingParams(max_tokens=1, ignore_eos=True))[0]
    assert single.metrics.tpot(1) is None  # no token after the first: no TPOT
