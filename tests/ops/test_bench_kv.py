"""`baton bench kv` runs end to end on a tiny payload and reports its ratios and overlap."""

from __future__ import annotations

import json

from baton.ops.bench import kv


def test_bench_kv_reports_ratios_and_hidden_fraction(tmp_path, capsys):
    out = tmp_path / "kv.json"
    kv.main(json_path=str(out), sizes_mib=(1,), repeats=2, overlap_mib=1)
    report = json.loads(out.read_text())
    ratios = report["ratios"]
    assert set(ratios) >= {"grpc_vs_raw_tcp", "grpc_vs_ray_object_store"}
    assert all(v > 0 for v in ratios.values())
    (size,) = report["sizes"]
    assert size["blocks"] == kv.blocks_for(1)
    assert set(size["systems"]) == {"grpc_link", "grpc_link_prepacked", "raw_tcp",
                                    "ray_object_store"}
    assert all(s["best_mib_s"] >= s["median_mib_s"] > 0 for s in size["systems"].values())
    overlap = report["overlap"]
    for figures in (overlap, overlap["accelerator_like"]):
        assert 0.0 <= figures["hidden_fraction"] <= 1.0
    assert overlap["compute_s"] > 0 and overlap["transfer_s"] > 0 and overlap["streamed_s"] > 0
    assert report["machine"]["cores"] >= 1
    assert "grpc_vs_raw_tcp" in capsys.readouterr().out
