"""A pool's engine options are checked when the cluster config loads, not when a worker starts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from baton.actors.worker import WorkerSpec
from baton.cluster.config import load_config
from baton.cluster.pools import worker_spec
from baton.engine_config import EngineConfig, MoEOffloadConfig
from baton.errors import ConfigError


def config(options: dict) -> dict:
    return {"pools": [{"name": "p", "role": "prefill"},
                      {"name": "d", "role": "decode", "engine": options}]}


@pytest.mark.parametrize(("options", "says"), [
    ({"block_size": 8, "max_num_seqz": 4}, "pools[1].engine.max_num_seqz is not a known field"),
    ({"block_size": 0}, "pools[1].engine.block_size must be >= 1, got 0"),
    ({"block_size": "eight"}, "pools[1].engine.block_size must be an integer, got 'eight'"),
    ({"quantization": "int3"}, "pools[1].engine.quantization must be 'int8' or 'int4'"),
    ({"quantization": "int4", "quant_group_size": 48},
     "pools[1].engine.quant_group_size must be one of (32, 64, 128) with int4, got 48"),
    ({"device": "tpu"}, "pools[1].engine.device must be 'cpu' or 'cuda[:N]'"),
    ({"dtype": "float16"}, "pool 'd': set dtype on the pool, not among its engine options"),
    ({"moe_offload": {"budget": 0.25, "policy": "fifo"}},
     "pools[1].engine.moe_offload.policy must be 'lru', 'lfu', 'lookahead', 'trace', "
     "'learned' or 'pregate', got 'fifo'"),
    ({"moe_offload": {"budget": 0.25, "policy": "learned"}},
     "pools[1].engine.moe_offload.predictor: policy 'learned' needs predictor"),
    ({"moe_offload": {"budget": -5}}, "pools[1].engine.moe_offload.budget must be bytes"),
    ({"moe_offload": {"budget": 0, "policy": "lookahead"}},
     "pools[1].engine.moe_offload.budget must be bytes"),
    ({"moe_offload": {"budget": 0.0}}, "pools[1].engine.moe_offload.budget must be bytes"),
    ({"moe_offload": {"policy": "lru"}}, "pools[1].engine.moe_offload.budget is required"),
])
def test_bad_engine_options_fail_the_config_load_naming_the_field(options, says):
    with pytest.raises(ConfigError, match="invalid cluster config") as info:
        load_config(config(options))
    assert says in str(info.value)


def test_each_worker_runs_its_pools_engine_options_with_the_pools_model_dtype_and_cores():
    cfg = load_config({
        "model": "tiny:llama",
        "pools": [{"name": "d", "role": "both", "dtype": "float32", "num_cpus": 2,
                   "engine": {"block_size": 8, "max_num_seqs": 4}},
                  {"name": "p", "role": "prefill", "model": "tiny:qwen3", "num_cpus": 2,
                   "engine": {"num_threads": 1}},
                  {"name": "m", "role": "both", "model": "tiny:mixtral",
                   "engine": {"moe_offload": {"budget": 0.25, "policy": "lookahead",
                                              "tier": "disk"}}}],
    })
    both, prefill, moe = (worker_spec(cfg, pool, "token").engine for pool in cfg.pools)
    assert both == EngineConfig(model="tiny:llama", dtype="float32", num_threads=2,
                                block_size=8, max_num_seqs=4)
    assert prefill == EngineConfig(model="tiny:qwen3", num_threads=1)
    assert moe.moe_offload == MoEOffloadConfig(budget=0.25, policy="lookahead", tier="disk")


def test_a_worker_spec_checks_engine_options_given_as_a_dict_before_any_actor_starts():
    spec = WorkerSpec(model="tiny:llama", engine={"block_size": 8}, kv_token="token")
    assert spec.engine == EngineConfig(model="tiny:llama", block_size=8)
    with pytest.raises(ConfigError, match=r"unknown engine option\(s\) \['block_sise'\]"):
        WorkerSpec(model="tiny:llama", engine={"block_sise": 8}, kv_token="token")


def test_the_readmes_moe_cluster_config_loads_with_offload_on_its_decode_pool():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("## Serving a Mixture-of-Experts model with expert offload", 1)[1]
    block = re.search(r"```yaml\n(# moe-cluster.yaml\n.*?)```", section, re.DOTALL)
    assert block is not None, "the section's cluster config"
    cfg = load_config(yaml.safe_load(block.group(1)))
    decode = next(p for p in cfg.pools if p.role == "decode")
    assert worker_spec(cfg, decode, "token").engine.moe_offload == MoEOffloadConfig(
        budget=0.25, policy="pregate", tier="disk")
    assert cfg.model == "~/models/smollm2-moe"  # where `baton moefy --out` wrote it
