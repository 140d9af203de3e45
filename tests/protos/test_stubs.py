"""The committed gRPC stubs match their `.proto` files, and the check notices when they don't."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from baton.protos import kv_link_pb2

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
    anchor = "uint32 crc32c = 11;"
    assert anchor in text
    proto.write_text(text.replace(anchor, anchor + "\n  string extra = 99;"))

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
        first_layer=3,
        num_layers=2,
        block_ids=[4, 9, 2],
        dtype="bfloat16",
        shape=[2, 4, 3, 16, 64],
        offset=1 << 33,  # past 32 bits: the uint64 fields must hold it
        total_bytes=(1 << 34) + 6,
        length=(1 << 33) + 6,
        crc32c=0xDEADBEEF,
    )
    parsed = kv_link_pb2.KVChunk.FromString(chunk.SerializeToString())
    assert parsed == chunk
    assert parsed.total_bytes == (1 << 34) + 6
    assert list(parsed.block_ids) == [4, 9, 2]

    result = kv_link_pb2.PushResult(transfer_id="t-1", layers_received=30, bytes_received=1 << 40)
    assert kv_link_pb2.PushResult.FromString(result.SerializeToString()) == result
