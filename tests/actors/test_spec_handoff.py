"""Speculation through the prefill/decode path: the prompt's KV arrives over real gRPC, the
decode worker speculates from the first token on, and the tokens are one engine's alone."""

from __future__ import annotations

import random

import pytest

from baton.actors.engine import Engine
from baton.actors.handoff import HandoffEngine
from baton.actors.kv_link import KVReceiver, KVSender
from baton.sampling import SamplingParams
from tests.actors.test_handoff import handoff
from tests.conftest import assert_no_leaks, run_to_completion

TOKEN = "spec-handoff-token"
MODEL = "tiny:qwen2"
METHODS = ["ngram", "lookahead", "layerskip", "draft"]


@pytest.fixture(scope="module")
def pair():
    # The prefill worker offers no method: it only computes prompts.
    prefill = HandoffEngine(MODEL, dtype="float32", block_size=8, methods=[])
    decode = HandoffEngine(MODEL, dtype="float32", block_size=8, methods=METHODS,
                           draft_model=MODEL)
    receiver = KVReceiver(decode.cache, token=TOKEN)
    sender = KVSender(receiver.address, TOKEN, chunk_bytes=4096)
    yield prefill, decode, receiver, sender
    sender.close()
    receiver.stop(None)


def test_decode_worker_speculates_after_the_handoff(pair):
    prefill, decode, receiver, sender = pair
    rng = random.Random(1)
    unit = [rng.randrange(256) for _ in range(6)]
    prompts = [unit * 8, [rng.randrange(256) for _ in range(40)], unit * 5 + [7, 7], unit * 9]
    alone = Engine(MODEL, dtype="float32").generate(
        prompts, SamplingParams(max_tokens=24, ignore_eos=True))
    reservations = []
    for i, (prompt, method) in enumerate(zip(prompts, METHODS, strict=True)):
        params = SamplingParams(max_tokens=24, ignore_eos=True, method=method,
                                num_speculative_tokens=4)
        reservations.append(handoff(prefill, decode, receiver, sender, prompt, params,
                                    f"s{i}")[0])
    final = run_to_completion(decode)
    outs = [final[r.request_id] for r in reservations]
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]
    assert all(o.metrics.prefill_path == "disaggregated" for o in outs)
    assert all(o.metrics.spec_draft_tokens > 0 for o in outs)
    # The draft model caught up on the prompt it never saw: the target as its own draft
    # accepts everything.
    assert outs[3].metrics.spec_accepted_tokens == outs[3].metrics.spec_draft_tokens
    assert_no_leaks(prefill)
    assert_no_leaks(decode)
