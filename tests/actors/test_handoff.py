"""Prefill on one engine, KV over real gRPC, decode on another: the tokens are those of one engine
alone, a cached prefix is not sent again, and a failed handoff leaks nothing."""

from __future__ import annotations

import random
import threading

import pytest

from baton.actors.engine import Engine
from baton.actors.handoff import HandoffEngine
from baton.actors.kv_link import KVReceiver, KVSender
from baton.actors.kv_transfer import payload_nbytes
from baton.errors import KVTransferError
from baton.sampling import SamplingParams
from tests.actors.kv_faults import corrupting_encode
from tests.conftest import assert_no_leaks, run_to_completion

TOKEN = "handoff-token"
MODEL = "tiny:qwen2"


@pytest.fixture(scope="module")
def pair():
    prefill = HandoffEngine(MODEL, dtype="float32", block_size=8)
    decode = HandoffEngine(MODEL, dtype="float32", block_size=8)
    receiver = KVReceiver(decode.cache, token=TOKEN)
    sender = KVSender(receiver.address, TOKEN, chunk_bytes=4096)
    yield prefill, decode, receiver, sender
    sender.close()
    receiver.stop(None)


def handoff(prefill, decode, receiver, sender, prompt, params, tid):
    """What a decode worker and a prefill worker do for one request (decode first)."""
    res = decode.reserve_import(prompt, params)
    receiver.expect(tid, res.request_id, res.block_ids, timeout_s=20)
    prid, export = prefill.add_export(prompt, params, res.skip_blocks)
    result = {}

    def push():
        try:
            result["push"] = sender.push(tid, res.request_id, res.block_ids, export.layers(),
                                         prefill.cache.spec, timeout_s=20)
        except KVTransferError as exc:
            result["error"] = exc

    thread = threading.Thread(target=push)
    thread.start()
    first = None
    while first is None:
        for out in prefill.step():
            if out.request_id == prid and out.finished:
                first = out.token_ids[0]
    thread.join(20)
    receiver.wait(tid)
    decode.complete_import(res.request_id, first)
    return res, result["push"]



def test_handoff_gives_the_single_engine_tokens(pair):
    prefill, decode, receiver, sender = pair
    rng = random.Random(0)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (5, 8, 23, 64, 100)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    alone = Engine(MODEL, dtype="float32").generate(prompts, params)
    reservations = [handoff(prefill, decode, receiver, sender, p, params, f"x{i}")[0]
                    for i, p in enumerate(prompts)]
    final = run_to_completion(decode)  # all five decode together in one batch
    got = [final[r.request_id].token_ids for r in reservations]
    assert got == [o.token_ids for o in alone]
    assert all(final[r.request_id].finish_reason == "length" for r in reservations)
    assert_no_leaks(prefill)
    assert_no_leaks(decode)


def test_cached_prefix_is_not_sent_again(pair):
    prefill, decode, receiver, sender = pair
    shared = list(range(30, 70))  # 40 tokens = 5 full blocks of 8
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    first, push1 = handoff(prefill, decode, receiver, sender, shared + [1, 2, 3], params, "p1")
    run_to_completion(decode)
    second, push2 = handoff(prefill, decode, receiver, sender, shared + [9, 9, 9], params, "p2")
    out = run_to_completion(decode)[second.request_id]
    assert first.skip_blocks == 0 and second.skip_blocks == 5
    per_block = payload_nbytes(decode.cache.spec, 1) * decode.cache.spec.num_layers
    assert push1.bytes_received == len(first.block_ids) * per_block
    assert push2.bytes_received == len(second.block_ids) * per_block == 1 * per_block
    alone = Engine(MODEL, dtype="float32").generate([shared + [9, 9, 9]], params)[0]
    assert out.token_ids == alone.token_ids
    assert_no_leaks(decode)


def test_failed_transfer_frees_the_reservation(pair):
    prefill, decode, receiver, sender = pair
    res = decode.reserve_import(list(range(50)), SamplingParams(max_tokens=5))
    receiver.expect("dead", res.request_id, res.block_ids, timeout_s=0.2)
    # The prefill worker never pushes (it died): the wait times out.
    with pytest.raises(KVTransferError, match="deadline"):
        receiver.wait("dead")
    decode.fail_import(res.request_id, "prefill worker lost")
    final = run_to_completion(decode)[res.request_id]
    assert final.finish_reason == "error" and "prefill worker lost" in final.error
    assert_no_leaks(decode)


def test_a_chunk_failing_mid_handoff_fails_it_and_frees_the_reservation(pair, monkeypatch):
    prefill, decode, receiver, _ = pair
    monkeypatch.setattr("baton.actors.kv_link.encode", corrupting_encode(layer=1))
    sender = KVSender(receiver.address, TOKEN, chunk_bytes=4096, in_flight=3)
    res = decode.reserve_import(list(range(60)), SamplingParams(max_tokens=5))
    transfer = receiver.expect("split", res.request_id, res.block_ids, timeout_s=20)
    src = list(range(len(res.block_ids)))
    with pytest.raises(KVTransferError, match="checksum mismatch in layer 1"):
        sender.push_blocks(prefill.cache, "split", res.request_id, src, res.block_ids,
                           timeout_s=20)
    with pytest.raises(KVTransferError, match="checksum mismatch in layer 1"):
        receiver.wait("split")
    assert transfer.calls > 1  # the transfer was split, and the calls that were fine
    decode.fail_import(res.request_id, "KV transfer failed")  # did not complete it
    assert run_to_completion(decode)[res.request_id].finish_reason == "error"
    assert_no_leaks(decode)
    sender.close()


def test_abort_while_waiting_for_kv(pair):
    _, decode, _, _ = pair
    res = decode.reserve_import([5] * 20, SamplingParams(max_tokens=5))
    decode.abort(res.request_id)
    assert run_to_completion(decode)[res.request_id].finish_reason == "abort"
    assert_no_leaks(decode)


def test_a_cancelled_reservation_can_be_prefilled_locally_under_its_own_id(pair):
    # What a decode worker does when its prefill worker is lost: drop the reservation and run
    # the request itself, keeping the id its client knows.
    _, decode, _, _ = pair
    prompt, params = list(range(100, 140)), SamplingParams(max_tokens=6, ignore_eos=True, seed=3,
                                                           temperature=1.0)
    res = decode.reserve_import(prompt, params, request_id="mine")
    decode.cancel_import(res.request_id)
    assert_no_leaks(decode)
    decode.add_request(prompt, params, request_id="mine")
    out = run_to_completion(decode)["mine"]
    alone = Engine(MODEL, dtype="float32").generate([prompt], params)[0]
    assert out.token_ids == alone.token_ids and out.text == alone.text
    assert_no_leaks(decode)
