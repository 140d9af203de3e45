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
    STREAMS_HEADER,
    TOKEN_HEADER,
    TRANSFER_HEADER,
    LayerFeed,
    checksum,
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
    sender = KVSender(receiver.address, TOKEN)
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


def _raw_push(receiver, chunks, token=TOKEN, streams="1"):
    """Push `(header, payload)` pairs as the wire carries them: header message, payload message."""
    with grpc.insecure_channel(receiver.address) as ch:
        push = ch.stream_unary(PUSH_METHOD)
        messages = (m for header, data in chunks for m in (header.SerializeToString(), data))
        metadata = ((TOKEN_HEADER, token), (TRANSFER_HEADER, chunks[0][0].transfer_id),
                    (STREAMS_HEADER, streams))
        return push(messages, timeout=5, metadata=metadata)


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
        (_chunk(offset=64), "offset"),
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
    ("chunk_bytes", "streams"),
    [
        (1000, 3),  # each 3 KiB layer cut across chunks, on three streams
        (8192, 2),  # two layers per message, on two streams
        (8192, 1),  # two layers per message, one stream
    ],
)
def test_a_transfer_split_across_streams_lands_every_layer_in_its_blocks(
        src, receiver, chunk_bytes, streams):
    src_ids, dst_ids = [3, 9, 1], [17, 0, 5]
    transfer = receiver.expect("ms", "rm", dst_ids, timeout_s=10)
    sender = KVSender(receiver.address, TOKEN, chunk_bytes=chunk_bytes, streams=streams)
    result = sender.push_blocks(src, "ms", "rm", src_ids, dst_ids, timeout_s=10)
    receiver.wait("ms")
    assert transfer.streams == streams  # the receiver saw that many calls announced
    assert result.layers_received == SPEC.num_layers
    assert result.bytes_received == 3 * SPEC.bytes_per_block
    assert _same_blocks(src, receiver.cache, src_ids, dst_ids)
    untouched = [i for i in range(20) if i not in dst_ids]
    assert not receiver.cache.keys[0][:, untouched].any()
    sender.close()


def test_a_corrupted_chunk_on_one_stream_fails_the_whole_transfer(src, receiver, monkeypatch):
    monkeypatch.setattr("baton.actors.kv_link.encode", corrupting_encode(layer=3))
    receiver.expect("bad", "rb", [4, 5], timeout_s=10)
    sender = KVSender(receiver.address, TOKEN, chunk_bytes=1024, streams=2)
    with pytest.raises(KVTransferError, match="checksum mismatch in layer 3"):
        sender.push_blocks(src, "bad", "rb", [0, 1], [4, 5], timeout_s=10)
    with pytest.raises(KVTransferError, match="checksum mismatch in layer 3"):
        receiver.wait("bad")
    # Layer 3 (corrupted) never reached the cache.
    assert not receiver.cache.keys[3][:, [4, 5]].any()
    sender.close()


def test_a_producer_failing_mid_transfer_fails_it_at_once(src, receiver):
    sender = KVSender(receiver.address, TOKEN, chunk_bytes=1024, streams=2)
    receiver.expect("warm", "rw", [6], timeout_s=10)  # the channel's own threads start here
    sender.push_blocks(src, "warm", "rw", [0], [6], timeout_s=10)
    before = set(threading.enumerate())
    transfer = receiver.expect("die", "rd", [6], timeout_s=10)

    def layers():
        for layer in range(2):
            yield layer, pack_layer(src, layer, torch.tensor([0]))
        # Both streams have started before the producer dies.
        for _ in range(500):
            if transfer.layers_done == {0, 1}:
                break
            threading.Event().wait(0.01)
        raise RuntimeError("prefill crashed")

    with pytest.raises(RuntimeError, match="prefill crashed"):
        sender.push("die", "rd", [6], layers(), SPEC, timeout_s=10)
    # The receiver learns of it from the streams, not from its deadline.
    with pytest.raises(KVTransferError, match="cancelled by its sender|ended after 2 of 4"):
        receiver.wait("die")
    # And no thread feeding the push's streams is left waiting for layers that will not come.
    wait_until(lambda: not [t for t in set(threading.enumerate()) - before
                            if not t.name.startswith("kv-recv")],
               timeout_s=10, what="the push's stream threads to end")
    sender.close()


def test_layers_ready_at_once_travel_in_groups_and_streams_take_turns():
    feed = LayerFeed(streams=2, size=3)
    for layer in range(4):
        feed.put(layer, torch.zeros(1, dtype=torch.uint8))
    feed.close()
    first, second = feed.take(0), feed.take(1)
    assert (first.first_layer, len(first.payloads)) == (0, 3)
    assert (second.first_layer, len(second.payloads)) == (3, 1)
    assert feed.take(0) is None and feed.take(1) is None
