"""The KV link over real gRPC on loopback: layers land in the reserved blocks, and every kind of
bad push is refused with a clear error."""

from __future__ import annotations

import queue
import threading

import grpc
import pytest
import torch

from baton.actors.handoff import KVExport
from baton.actors.kv_cache import KVCacheSpec, PagedKVCache
from baton.actors.kv_link import KVReceiver, KVSender
from baton.actors.kv_transfer import pack_layer
from baton.actors.kv_wire import (
    PUSH_METHOD,
    TOKEN_HEADER,
    TRANSFER_HEADER,
    checksum,
    frame,
)
from baton.errors import KVTransferError
from baton.protos import kv_link_pb2
from tests.actors.kv_faults import corrupting_encode
from tests.conftest import wait_until

SPEC = KVCacheSpec(num_layers=4, num_kv_heads=2, head_dim=16, block_size=8, dtype=torch.bfloat16)
TOKEN = "s3cret"


@pytest.fixture()
def src() -> PagedKVCache:
    cache = PagedKVCache(SPEC, 16, torch.device("cpu"))
    for t in (*cache.keys, *cache.values):
        t.copy_(torch.randn(t.shape).to(t.dtype))
    return cache


@pytest.fixture()
def receiver():
    r = KVReceiver(PagedKVCache(SPEC, 20, torch.device("cpu")), token=TOKEN)
    yield r
    r.stop(None)


def _same_blocks(src, dst, src_ids, dst_ids) -> bool:
    return all(
        torch.equal(dst.keys[layer][:, d], src.keys[layer][:, s])
        and torch.equal(dst.values[layer][:, d], src.values[layer][:, s])
        for layer in range(SPEC.num_layers)
        for s, d in zip(src_ids, dst_ids, strict=True)
    )


def test_push_lands_every_layer_in_the_reserved_blocks(src, receiver):
    src_ids, dst_ids = [3, 9, 1], [17, 0, 5]
    receiver.expect("t1", "r1", dst_ids, timeout_s=10)
    # Small chunks: each layer crosses in several messages.
    sender = KVSender(receiver.address, TOKEN, chunk_bytes=1000)
    result = sender.push_blocks(src, "t1", "r1", src_ids, dst_ids, timeout_s=10)
    assert result.layers_received == SPEC.num_layers
    receiver.wait("t1")
    assert _same_blocks(src, receiver.cache, src_ids, dst_ids)
    sender.close()


def test_layers_stream_as_they_are_produced(src, receiver):
    receiver.expect("t2", "r2", [4, 5], timeout_s=10)
    export = KVExport(skip_blocks=0, feed=queue.Queue())
    feed, layers = export.feed, export.layers()
    sender = KVSender(receiver.address, TOKEN)  # each layer goes at once
    done = {}
    thread = threading.Thread(
        target=lambda: done.setdefault("r", sender.push("t2", "r2", [4, 5], layers, SPEC,
                                                        timeout_s=10)))
    thread.start()
    transfer = receiver._transfers["t2"]
    for layer in range(SPEC.num_layers):
        feed.put((layer, pack_layer(src, layer, torch.tensor([0, 1]))))
        # The receiver holds each layer before the producer has made the next one.
        for _ in range(200):
            if layer in transfer.layers_done:
                break
            threading.Event().wait(0.01)
        assert transfer.layers_done == set(range(layer + 1))
    feed.put(None)
    thread.join(10)
    assert done["r"].layers_received == SPEC.num_layers
    receiver.wait("t2")


def test_streamed_layers_go_out_together_once_they_hold_the_least_group(src, receiver):
    """Layers of 2 KiB with a 5 KiB least group: nothing crosses until the third layer is
    made, then the three in one call; the fourth and last when the layers end."""
    transfer = receiver.expect("tg", "rg", [4, 5], timeout_s=10)
    export = KVExport(skip_blocks=0, feed=queue.Queue())
    sender = KVSender(receiver.address, TOKEN, min_group_bytes=5 * 1024)
    layer = pack_layer(src, 0, torch.tensor([0, 1]))
    assert layer.numel() == 2048
    done = {}
    thread = threading.Thread(target=lambda: done.setdefault("r", sender.push(
        "tg", "rg", [4, 5], export.layers(), SPEC, timeout_s=10)))
    thread.start()
    for i in range(2):
        export.feed.put((i, pack_layer(src, i, torch.tensor([0, 1]))))
    threading.Event().wait(0.2)
    assert transfer.calls == 0 and not transfer.layers_done  # held: 4 KiB so far
    export.feed.put((2, pack_layer(src, 2, torch.tensor([0, 1]))))
    wait_until(lambda: transfer.layers_done == {0, 1, 2}, timeout_s=10,
               what="the first three layers")
    assert transfer.calls == 1
    for i in range(3, SPEC.num_layers):
        export.feed.put((i, pack_layer(src, i, torch.tensor([0, 1]))))
    export.feed.put(None)
    thread.join(10)
    assert done["r"].layers_received == SPEC.num_layers
    receiver.wait("tg")
    assert transfer.calls == 2
    assert _same_blocks(src, receiver.cache, [0, 1], [4, 5])
    sender.close()


def test_a_push_under_way_when_the_receiver_gives_up_writes_no_more_layers(src, receiver):
    dst_ids = [6, 7]
    receiver.expect("t3", "r3", dst_ids, timeout_s=10)
    transfer = receiver._transfers["t3"]
    export = KVExport(skip_blocks=0, feed=queue.Queue())
    sender = KVSender(receiver.address, TOKEN)
    errors: list[Exception] = []

    def push() -> None:
        try:
            sender.push("t3", "r3", dst_ids, export.layers(), SPEC, timeout_s=10)
        except KVTransferError as exc:
            errors.append(exc)

    thread = threading.Thread(target=push)
    thread.start()
    export.feed.put((0, pack_layer(src, 0, torch.tensor([0, 1]))))
    for _ in range(500):  # the first layer lands while the producer is still computing
        if 0 in transfer.layers_done:
            break
        threading.Event().wait(0.01)
    before = receiver.cache.keys[1][:, dst_ids].clone()
    receiver.forget("t3")  # the request was aborted: its blocks go back to the pool
    for layer in range(1, SPEC.num_layers):
        export.feed.put((layer, pack_layer(src, layer, torch.tensor([0, 1]))))
    export.feed.put(None)
    thread.join(10)
    assert errors and "given up" in str(errors[0])
    assert torch.equal(receiver.cache.keys[1][:, dst_ids], before)
    sender.close()


def _raw_push(receiver, chunks, token=TOKEN, messages=None):
    """Push `(header, payload)` pairs as the wire carries them: one frame per unary call."""
    with grpc.insecure_channel(receiver.address) as ch:
        push = ch.unary_unary(PUSH_METHOD)
        metadata = ((TOKEN_HEADER, token), (TRANSFER_HEADER, chunks[0][0].transfer_id))
        for message in messages or [frame(header, data) for header, data in chunks]:
            answer = push(message, timeout=5, metadata=metadata)
        return kv_link_pb2.PushResult.FromString(answer)


def _chunk(**kw):
    data = kw.pop("data", b"\x00" * 64)
    fields = dict(transfer_id="t", request_id="r", first_layer=0, num_layers=1, block_ids=[2],
                  dtype="bfloat16", shape=[2, 2, 1, 8, 16], offset=0,
                  total_bytes=2 * 2 * 8 * 16 * 2, length=len(data), crc32c=checksum(data))
    fields.update(kw)
    return kv_link_pb2.KVChunk(**fields), data


@pytest.mark.parametrize(
    ("chunk", "says"),
    [
        (_chunk(crc32c=1), "checksum"),
        (_chunk(block_ids=[3]), "block ids"),
        (_chunk(shape=[2, 2, 1, 8, 8]), "shape"),
        (_chunk(dtype="float32"), "dtype"),
        (_chunk(request_id="other"), "another transfer"),
        (_chunk(transfer_id="unknown"), "no transfer"),
        (_chunk(first_layer=9), "layer"),
        (_chunk(first_layer=3, num_layers=2), "layer"),
        (_chunk(length=65), "announced 65 bytes"),
        (_chunk(offset=1000), "runs past the group's 1024 bytes"),
    ],
)
def test_bad_chunks_are_refused_and_the_transfer_fails(receiver, chunk, says):
    receiver.expect("t", "r", [2], timeout_s=5)
    with pytest.raises(grpc.RpcError) as info:
        _raw_push(receiver, [chunk])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in info.value.details()
    if chunk[0].transfer_id == "t":
        with pytest.raises(KVTransferError, match=says):
            receiver.wait("t")
    assert not receiver.cache.keys[0].any()  # nothing was written


def test_wrong_token_is_refused(src, receiver):
    receiver.expect("t3", "r3", [1], timeout_s=5)
    sender = KVSender(receiver.address, "not-the-token")
    with pytest.raises(KVTransferError, match="UNAUTHENTICATED"):
        sender.push_blocks(src, "t3", "r3", [0], [1], timeout_s=5)


def test_push_that_stops_early_fails_the_transfer(src, receiver):
    receiver.expect("t4", "r4", [1], timeout_s=5)
    sender = KVSender(receiver.address, TOKEN)
    with pytest.raises(KVTransferError, match="ended after 2 of 4 layers"):
        layers = ((i, pack_layer(src, i, torch.tensor([0]))) for i in range(2))
        sender.push("t4", "r4", [1], layers, SPEC, timeout_s=5)
    with pytest.raises(KVTransferError, match="ended after"):
        receiver.wait("t4")


def test_stalled_transfer_times_out(receiver):
    receiver.expect("t5", "r5", [1], timeout_s=0.2)
    with pytest.raises(KVTransferError, match="deadline"):
        receiver.wait("t5")
    # Once given up on, late chunks are refused.
    with pytest.raises(grpc.RpcError):
        _raw_push(receiver, [_chunk(transfer_id="t5", request_id="r5", block_ids=[1])])


@pytest.mark.parametrize(
    ("chunk_bytes", "in_flight", "calls"),
    [
        (1000, 3, 16),  # each 3 KiB layer cut across four chunks, three calls at a time
        (8192, 2, 2),  # two layers per call, both calls at once
        (8192, 1, 2),  # two layers per call, one after the other
    ],
)
def test_a_transfer_in_several_calls_lands_every_layer_in_its_blocks(
        src, receiver, chunk_bytes, in_flight, calls):
    src_ids, dst_ids = [3, 9, 1], [17, 0, 5]
    transfer = receiver.expect("ms", "rm", dst_ids, timeout_s=10)
    sender = KVSender(receiver.address, TOKEN, chunk_bytes=chunk_bytes, in_flight=in_flight)
    result = sender.push_blocks(src, "ms", "rm", src_ids, dst_ids, timeout_s=10)
    receiver.wait("ms")
    assert transfer.calls == calls
    assert result.layers_received == SPEC.num_layers
    assert result.bytes_received == 3 * SPEC.bytes_per_block
    assert _same_blocks(src, receiver.cache, src_ids, dst_ids)
    untouched = [i for i in range(20) if i not in dst_ids]
    assert not receiver.cache.keys[0][:, untouched].any()
    sender.close()


def test_chunks_of_a_cut_group_may_land_in_any_order_but_not_twice(src, receiver):
    payload = pack_layer(src, 2, torch.tensor([3, 9])).numpy().tobytes()  # 2 KiB
    chunks = [_chunk(transfer_id="oo", request_id="ro", block_ids=[7, 8], first_layer=2,
                     shape=[2, 2, 2, 8, 16], offset=off, total_bytes=len(payload),
                     data=payload[off : off + 768]) for off in (0, 768, 1536)]
    receiver.expect("oo", "ro", [7, 8], timeout_s=5)
    transfer = receiver._transfers["oo"]
    assert _raw_push(receiver, chunks[2:]).layers_received == 0  # the group is not whole yet
    assert _raw_push(receiver, chunks[:1]).layers_received == 0
    assert _raw_push(receiver, chunks[1:2]).layers_received == 1
    assert transfer.layers_done == {2}
    assert torch.equal(receiver.cache.keys[2][:, [7, 8]], src.keys[2][:, [3, 9]])
    with pytest.raises(grpc.RpcError) as info:
        _raw_push(receiver, chunks[:1])
    assert "sent twice" in info.value.details()
    with pytest.raises(KVTransferError, match="sent twice"):
        receiver.wait("oo")


def test_a_malformed_frame_is_refused(receiver):
    receiver.expect("mf", "rm", [2], timeout_s=5)
    header, data = _chunk(transfer_id="mf", request_id="rm")
    whole = frame(header, data)
    for message, says in ((b"\x01", "shorter than its length prefix"),
                          (b"\xff\xff\x00\x00" + whole[4:], "header announced"),
                          (whole[:4] + b"\xff" * (len(whole) - 4), "malformed chunk header")):
        with pytest.raises(grpc.RpcError) as info:
            _raw_push(receiver, [(header, data)], messages=[message])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert says in info.value.details()
    assert not receiver.cache.keys[0].any()


def test_a_corrupted_chunk_fails_the_whole_transfer(src, receiver, monkeypatch):
    monkeypatch.setattr("baton.actors.kv_link.encode", corrupting_encode(layer=3))
    receiver.expect("bad", "rb", [4, 5], timeout_s=10)
    sender = KVSender(receiver.address, TOKEN, chunk_bytes=1024, in_flight=2)
    with pytest.raises(KVTransferError, match="checksum mismatch in layer 3"):
        sender.push_blocks(src, "bad", "rb", [0, 1], [4, 5], timeout_s=10)
    with pytest.raises(KVTransferError, match="checksum mismatch in layer 3"):
        receiver.wait("bad")
    # Layer 3 (corrupted) never reached the cache.
    assert not receiver.cache.keys[3][:, [4, 5]].any()
    sender.close()


def test_a_producer_failing_mid_transfer_fails_it_at_once(src, receiver):
    sender = KVSender(receiver.address, TOKEN, chunk_bytes=1024, in_flight=2)
    receiver.expect("warm", "rw", [6], timeout_s=10)  # the channel's own threads start here
    sender.push_blocks(src, "warm", "rw", [0], [6], timeout_s=10)
    before = set(threading.enumerate())
    transfer = receiver.expect("die", "rd", [6], timeout_s=10)

    def layers():
        for layer in range(2):
            yield layer, pack_layer(src, layer, torch.tensor([0]))
        # Both layers have landed before the producer dies.
        for _ in range(500):
            if transfer.layers_done == {0, 1}:
                break
            threading.Event().wait(0.01)
        raise RuntimeError("prefill crashed")

    with pytest.raises(RuntimeError, match="prefill crashed"):
        sender.push("die", "rd", [6], layers(), SPEC, timeout_s=10)
    # The receiver learns of it from the sender, not from its deadline.
    with pytest.raises(KVTransferError, match="ended after 2 of 4"):
        receiver.wait("die")
    # And no thread of the push is left waiting for layers that will not come.
    wait_until(lambda: not [t for t in set(threading.enumerate()) - before
                            if not t.name.startswith("kv-recv")],
               timeout_s=10, what="the push's threads to end")
    sender.close()


def test_layers_ready_at_once_travel_in_groups_and_every_call_has_some():
    sender = KVSender("127.0.0.1:1", TOKEN, chunk_bytes=8192, in_flight=2)
    layer_bytes = 3 * SPEC.bytes_per_block // SPEC.num_layers  # 3 KiB: two fill a chunk
    assert sender.group_size(SPEC, 3) == 2 == 8192 // layer_bytes
    sender = KVSender("127.0.0.1:1", TOKEN, chunk_bytes=4096, in_flight=4)
    assert sender.group_size(SPEC, 3) == 1  # four chunks' worth, four calls in flight: one each
    sender = KVSender("127.0.0.1:1", TOKEN, chunk_bytes=1 << 20, in_flight=4)
    assert sender.group_size(SPEC, 3) == 4  # all of it fits one call: not split


def test_a_cpu_prefill_worker_groups_the_layers_it_streams():
    """Its sender shares the forward's cores: it sends layers together (see `MIN_GROUP_BYTES`)."""
    from baton.actors.kv_wire import MIN_GROUP_BYTES
    from baton.actors.worker import Worker, WorkerSpec

    worker = Worker(WorkerSpec(role="prefill", model="tiny:llama", kv_host="127.0.0.1",
                               kv_token=TOKEN))
    try:
        assert worker.engine.device.type == "cpu"
        sender = worker._sender("127.0.0.1:1")
        assert sender.min_group_bytes == MIN_GROUP_BYTES > 0
        assert KVSender("127.0.0.1:1", TOKEN).min_group_bytes == 0  # the default: one by one
    finally:
        worker.loop.stop()
        for s in worker._senders.values():
            s.close()
