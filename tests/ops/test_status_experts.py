"""`baton status` shows the expert cache of workers serving an offloaded MoE model (a compact
column in the table, every figure in JSON) and nothing extra for dense workers; the router's
Admin service builds those rows from the workers' `info()`."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import pytest

from baton.client import AdminClient
from baton.ops import cli, cluster_cmds
from baton.router.admin import worker_status
from tests.ops.admin_double import MOE_CACHE, AdminDouble, worker

TOKEN = "t0ken"
MOE_FIGURES = {"hits": 300, "misses": 100, "hit_rate": 0.75, "bytes_loaded": 4 * 2**20,
               "stall_seconds": 0.5}


@pytest.fixture
def admin() -> Iterator[AdminDouble]:
    double = AdminDouble(TOKEN).start()
    yield double
    double.stop()


def status(admin: AdminDouble, capsys, monkeypatch, *args: str) -> str:
    """What `baton status` prints against `admin`, rich's line wrapping undone."""
    monkeypatch.setattr(cluster_cmds, "_admin", lambda: AdminClient(admin.address, token=TOKEN))
    monkeypatch.setattr(sys, "argv", ["baton", "status", *args])
    monkeypatch.setenv("COLUMNS", "200")
    try:
        cli.main()
    except SystemExit as exc:
        assert not exc.code, capsys.readouterr().err
    captured = capsys.readouterr()
    assert not captured.err, captured.err
    return captured.out


def test_status_shows_a_moe_workers_expert_cache_and_nothing_for_a_dense_one(
        admin, capsys, monkeypatch):
    admin.workers = [worker("moe-0", "moe", "both", expert_cache=MOE_CACHE),
                     worker("dense-0", "dense", "both")]
    rows = {w["worker_id"]: w for w in
            json.loads(status(admin, capsys, monkeypatch, "-o", "json"))["workers"]}
    assert rows["moe-0"]["expert_cache"] == MOE_FIGURES
    assert "expert_cache" not in rows["dense-0"]

    table = " ".join(status(admin, capsys, monkeypatch).split())
    assert "┃ experts ┃" in table
    assert "moe-0 │ moe │ both │ ready │ 1 │ 0 │ 25.0% │ 0 (0 failed) │ 75% hit, 4.0 MiB " \
        "loaded, 0.50s stall │" in table
    assert "dense-0 │ dense │ both │ ready │ 1 │ 0 │ 25.0% │ 0 (0 failed) │ │" in table


def test_a_dense_clusters_status_table_has_no_experts_column(admin, capsys, monkeypatch):
    admin.workers = [worker("dense-0", "dense", "both")]
    assert "experts" not in status(admin, capsys, monkeypatch)


def test_the_admin_row_carries_the_expert_cache_of_a_moe_workers_info_only():
    cache = {"tier": "disk", "policy": "LookaheadPolicy", "capacity_experts": 6,
             "prefetches_issued": 9, "prefetch_precision": 0.5, **MOE_FIGURES}
    moe = worker_status({"worker_id": "moe-0", "kv_usage": 0.25, "expert_cache": cache})
    assert moe.expert_cache == MOE_CACHE
    dense = worker_status({"worker_id": "dense-0", "kv_usage": 0.25, "expert_cache": None})
    assert not dense.HasField("expert_cache")
