"""`baton bench kv` runs end to end on a tiny payload; its report's figures are those it timed."""

from __future__ import annotations

import json
import statistics

import pytest

from baton.ops.bench import kv

pytestmark = pytest.mark.ray  # starts Ray (see tests/conftest.py)


def test_bench_kv_reports_ratios_and_hidden_fraction(tmp_path, capsys):
    out = tmp_path / "kv.json"
    kv.main(json_path=str(out), sizes_mib=(kv.REPORTED_MIB, 5), repeats=2, overlap_mib=1)
    report = json.loads(out.read_text())
    reported, size = report["sizes"]
    assert size["blocks"] == kv.blocks_for(5)
    assert size["bytes"] == size["blocks"] * kv.SPEC.bytes_per_block  # one request's whole KV
    systems = size["systems"]
    assert set(systems) == {"grpc_link", "grpc_link_prepacked", "raw_tcp", "ray_object_store"}
    for s in systems.values():
        assert s["runs"] == 2  # every system, the baselines too, was timed every repeat
        assert s["best_mib_s"] == pytest.approx(size["bytes"] / kv.MIB / s["best_s"])
        assert s["median_mib_s"] == pytest.approx(size["bytes"] / kv.MIB / s["median_s"])
    # The ratios are quotients of the measured figures, at the sizes the report names.
    best = {name: s["best_mib_s"] for name, s in systems.items()}
    at_4 = {name: s["best_mib_s"] for name, s in reported["systems"].items()}
    assert report["ratio_basis"]["size_mib"] == 5
    assert report["ratios"] == {
        "grpc_vs_raw_tcp": pytest.approx(best["grpc_link"] / best["raw_tcp"]),
        "grpc_vs_ray_object_store": pytest.approx(best["grpc_link"] / best["ray_object_store"]),
        "grpc_prepacked_vs_raw_tcp": pytest.approx(best["grpc_link_prepacked"] / best["raw_tcp"]),
        "grpc_vs_raw_tcp_4mib": pytest.approx(at_4["grpc_link"] / at_4["raw_tcp"]),
    }
    overlap = report["overlap"]
    assert overlap["bytes"] == overlap["blocks"] * kv.SPEC.bytes_per_block
    for figures in (overlap, overlap["accelerator_like"]):
        rounds = figures["rounds"]
        assert {len(v) for v in rounds.values()} == {2}
        med = {k: statistics.median(v) for k, v in rounds.items()}
        assert {k: figures[k] for k in med} == med
        hidden = (med["compute_s"] + med["transfer_s"] - med["streamed_s"]) / med["transfer_s"]
        assert figures["hidden_fraction_unclamped"] == pytest.approx(hidden)
        assert figures["hidden_fraction"] == pytest.approx(min(1.0, max(0.0, hidden)))
    assert "grpc_vs_raw_tcp" in capsys.readouterr().out
