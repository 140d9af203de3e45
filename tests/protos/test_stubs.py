"""The committed gRPC stubs match their `.proto` files, and the check notices when they don't."""

from __future__ import annotations

import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from baton.protos import kv_link_pb2, kv_link_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"


def run_check(generate: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(generate), "--check"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_committed_stubs_are_fresh(tmp_path):
    # From an unrelated directory: the script finds protos/ by its own location.
    result = run_check(PROTOS / "generate.py", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_check_catches_a_changed_proto(tmp_path):
    copy = tmp_path / "protos"
    shutil.copytree(PROTOS, copy, ignore=shutil.ignore_patterns("__pycache__"))
    proto = copy / "kv_link.proto"
    text = proto.read_text()
    anchor = "uint32 crc32 = 10;"
    assert anchor in text
    proto.write_text(text.replace(anchor, anchor + "\n  string extra = 11;"))

    result = run_check(copy / "generate.py", cwd=tmp_path)
    assert result.returncode == 1
    assert "kv_link_pb2.py" in result.stderr
    assert "python protos/generate.py" in result.stderr
    # The committed tree is untouched by a check of the copy.
    assert "extra" not in (PROTOS / "kv_link.proto").read_text()


def test_kv_chunk_round_trip():
    chunk = kv_link_pb2.KVChunk(
        transfer_id="t-1",
        request_id="r-7",
        layer=3,
        block_ids=[4, 9, 2],
        dtype="bfloat16",
        shape=[2, 4, 3, 16, 64],
        offset=1 << 33,  # past 32 bits: the uint64 fields must hold it
        total_bytes=(1 << 33) + 6,
        data=b"\x00\xffkv\x00\x01",
        crc32=0xDEADBEEF,
    )
    parsed = kv_link_pb2.KVChunk.FromString(chunk.SerializeToString())
    assert parsed == chunk
    assert parsed.data == b"\x00\xffkv\x00\x01"
    assert list(parsed.block_ids) == [4, 9, 2]

    result = kv_link_pb2.PushResult(transfer_id="t-1", layers_received=30, bytes_received=1 << 40)
    assert kv_link_pb2.PushResult.FromString(result.SerializeToString()) == result


class _Tally(kv_link_pb2_grpc.KVLinkServicer):
    """Answers a push with what it received."""

    def Push(self, request_iterator, context):
        chunks = list(request_iterator)
        return kv_link_pb2.PushResult(transfer_id=chunks[0].transfer_id,
                                      layers_received=len({c.layer for c in chunks}),
                                      bytes_received=sum(len(c.data) for c in chunks))


def test_service_stubs_carry_a_push_under_the_protos_method_name():
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    kv_link_pb2_grpc.add_KVLinkServicer_to_server(_Tally(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    chunks = [kv_link_pb2.KVChunk(transfer_id="t-9", layer=layer, data=b"kv" * (layer + 1))
              for layer in (0, 1, 1, 2)]
    want = kv_link_pb2.PushResult(transfer_id="t-9", layers_received=3, bytes_received=16)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert kv_link_pb2_grpc.KVLinkStub(channel).Push(iter(chunks), timeout=30) == want
            # A peer built from the .proto alone calls it by package, service and method.
            push = channel.stream_unary(
                "/baton.kv.v1.KVLink/Push",
                request_serializer=kv_link_pb2.KVChunk.SerializeToString,
                response_deserializer=kv_link_pb2.PushResult.FromString)
            assert push(iter(chunks), timeout=30) == want
    finally:
        server.stop(None)
