"""`baton plan` from a question to a values file, and the errors that say what to change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from baton.cluster.config import load_config
from baton.cluster.planner.catalog import Catalog
from baton.cluster.planner.model import load_model
from baton.cluster.planner.plan import PlanRequest, layouts_for, plan
from baton.cluster.planner.search import SLO
from baton.cluster.planner.sim import Speculation
from baton.errors import ConfigError, ModelNotFoundError, PlanError
from baton.ops.cli import app
from baton.ops.plan_cmds import parse_speculation

QUICK = dict(model="llama-3-8b", workload="conversation", gpus=("L4",), thresholds=(64,),
             num_requests=80)


def test_plan_writes_values_that_load_as_the_cluster_config(tmp_path: Path) -> None:
    values, png = tmp_path / "values.yaml", tmp_path / "plan.png"
    result = CliRunner().invoke(app, [
        "plan", "--model", "llama-3-8b", "--gpus", "L4", "--decode-gpus", "H100,L4",
        "--thresholds", "64", "--requests", "80", "--slo-ttft", "1s", "--slo-tpot", "50ms",
        "--values", str(values), "--plot", str(png), "--output", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    raw = yaml.safe_load(values.read_text())
    assert set(raw) == {"cluster"}
    cfg = load_config(raw["cluster"])
    assert cfg.model == "meta-llama/Meta-Llama-3-8B-Instruct"
    gpus = {p.accelerator_type for p in cfg.pools}
    assert gpus <= {"H100", "L4"} and all(p.num_gpus >= 1 and p.device == "cuda"
                                          for p in cfg.pools)
    price = sum(Catalog().get(p.accelerator_type).price_per_hour * p.num_gpus * p.replicas
                for p in cfg.pools)
    assert price == pytest.approx(report["winner"]["price_per_hour"])
    ranked = [row["goodput_per_dollar_hour"] for row in report["layouts"]]
    assert ranked == sorted(ranked, reverse=True)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_a_target_rate_gets_the_cheapest_layout_that_serves_it() -> None:
    small = plan(PlanRequest(**QUICK))
    rate = 3 * small.ranked[0].goodput_rps
    big = plan(PlanRequest(**QUICK, rate=rate))
    assert big.winner.price_per_hour >= 2 * small.ranked[0].price_per_hour
    assert big.winner.price_per_hour <= 4 * small.ranked[0].price_per_hour + 1e-9


def test_an_unknown_gpu_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown GPU 'B200'.*H100"):
        plan(PlanRequest(**{**QUICK, "gpus": ("B200",)}))


def test_slos_no_layout_can_meet_say_so() -> None:
    with pytest.raises(PlanError, match="relax the SLOs"):
        plan(PlanRequest(**QUICK, slo=SLO(ttft_s=0.001, tpot_s=0.05)))


def test_a_model_that_fits_no_gpu_says_what_to_change(tmp_path: Path) -> None:
    huge = {"hidden_size": 32768, "num_hidden_layers": 160, "num_attention_heads": 128,
            "intermediate_size": 131072, "vocab_size": 128000}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(huge))
    with pytest.raises(ConfigError, match="fits none of .*larger GPUs"):
        plan(PlanRequest(**{**QUICK, "model": str(path)}))


def test_an_unknown_model_names_the_built_in_ones() -> None:
    with pytest.raises(ModelNotFoundError):
        load_model("no-such-model/anywhere")


def test_published_model_sizes() -> None:
    llama = load_model("llama-3-8b")
    assert llama.params == pytest.approx(8.03e9, rel=0.01)
    assert llama.kv_bytes_per_token == 32 * 2 * 8 * 128 * 2
    mixtral = load_model("mixtral-8x7b")
    assert mixtral.params == pytest.approx(46.7e9, rel=0.01)
    assert mixtral.active_params == pytest.approx(12.9e9, rel=0.02)


def test_a_catalog_file_overrides_prices_and_adds_gpus(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"gpus": {
        "H100": {"price_per_hour": 2.5},
        "MI300X": {"tflops": 1307, "mem_bw_tbps": 5.3, "memory_gb": 192, "nic_gbps": 400,
                   "price_per_hour": 4.0}}}))
    cat = Catalog.load(path)
    assert cat.get("H100").price_per_hour == 2.5
    assert cat.get("MI300X").memory == 192e9
    path.write_text(yaml.safe_dump({"gpus": {"X1": {"tflops": 10}}}))
    with pytest.raises(ConfigError, match="new GPU"):
        Catalog.load(path)


def test_a_replayed_trace_sets_the_rate_to_serve(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    rows += [f"{i * 0.25},{200 + 37 * (i % 20)},{10 + 7 * (i % 9)}" for i in range(200)]
    path.write_text("\n".join(rows) + "\n")
    result = plan(PlanRequest(**QUICK, trace=str(path)))
    assert result.target_rate == pytest.approx(4.0)
    best = result.ranked[0]
    assert result.winner.price_per_hour >= best.price_per_hour * (4.0 / best.goodput_rps) - 1e-9


def test_a_cpu_profile_plans_worker_processes_on_cores(tmp_path: Path) -> None:
    profile = Path(__file__).parent / "data" / "cpu_smollm2_1thread.json"
    result = plan(PlanRequest(profile=str(profile), workload="bench-pd", cores=4,
                              slo=SLO(ttft_s=300.0, tpot_s=0.7), thresholds=(256,),
                              num_requests=60))
    assert {e.layout.num_devices for e in result.ranked} == {1, 2, 3, 4}
    cfg = load_config(result.winner.values("default")["cluster"])
    assert all(p.device == "cpu" and p.accelerator_type is None and p.num_cpus == 1
               for p in cfg.pools)
    assert sum(p.replicas for p in cfg.pools) <= 4


def test_a_profile_measured_on_an_h200_calibrates_its_layouts() -> None:
    """`baton profile --device cuda --gpu H200` on an H200 (a Llama-3.2-3B-shaped model, random
    weights, CUDA graphs on): the planner fits that GPU's efficiencies to it and plans H200
    layouts with them."""
    profile = Path(__file__).parent / "data" / "h200_llama32_3b_shape.json"
    base = {**QUICK, "gpus": ("H200",), "slo": SLO(ttft_s=1.0, tpot_s=0.05)}
    _, layouts = layouts_for(PlanRequest(**base, profile=str(profile)))
    effs = {pool.cost.eff for layout in layouts for pool in layout.pools}
    assert len(effs) == 1
    eff = effs.pop()
    # Prefill reached about half the bf16 peak; a decode step's fixed cost is ~3.5 ms.
    assert 0.3 < eff.compute < 0.8 and 0.002 < eff.overhead_s < 0.005
    # Prompts run eagerly (decode steps replay graphs): a prompt iteration costs more fixed time.
    assert eff.prefill_overhead_s > eff.overhead_s
    measured = plan(PlanRequest(**base, profile=str(profile))).ranked[0]
    typical = plan(PlanRequest(**base)).ranked[0]
    assert measured.goodput_rps > 0
    # Half the typical share of the bandwidth (0.49 against 0.75): decode is slower.
    assert measured.tpot_p50_s > typical.tpot_p50_s


def test_a_measured_method_raises_goodput_under_a_tight_tpot_slo() -> None:
    """Decode on a GPU is memory-bound, so verifying a draft costs little: 2.2 tokens a step for
    every request lets more of them meet a TPOT SLO that plain decoding barely misses."""
    tight = {**QUICK, "slo": SLO(ttft_s=2.0, tpot_s=0.08)}
    plain = plan(PlanRequest(**tight)).ranked[0]
    fast = plan(PlanRequest(**tight, speculation=Speculation(2.2, 5))).ranked[0]
    assert fast.tpot_p50_s < 0.6 * plain.tpot_p50_s
    assert fast.goodput_rps > plain.goodput_rps


def test_plan_takes_a_method_from_the_command_line() -> None:
    assert parse_speculation("2.2:5:0.5") == Speculation(2.2, 5, 0.5)
    assert parse_speculation(None) is None
    out = CliRunner().invoke(app, ["plan", "--model", "llama-3-8b", "--speculation", "fast"])
    assert isinstance(out.exception, ConfigError)
    assert "TOKENS_PER_STEP:VERIFIED_TOKENS" in str(out.exception)
