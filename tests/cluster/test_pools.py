"""Pools from config on a multi-node Ray cluster (one machine, nodes with their own resources):
prefill lands on one accelerator type, decode on the other, and the KV crosses between nodes."""

from __future__ import annotations

import random

import pytest
import ray
from ray.cluster_utils import Cluster

from baton.actors.engine import Engine
from baton.cluster.config import load_config
from baton.cluster.pools import start_pools
from baton.errors import ConfigError
from baton.sampling import SamplingParams

pytestmark = pytest.mark.ray  # starts Ray (see tests/conftest.py)

ENGINE = {"block_size": 8}
CONFIG = {
    "model": "tiny:qwen3",
    "prefill_threshold": 8,
    "pools": [
        {"name": "prefill-a100", "role": "prefill", "accelerator_type": "A100",
         "dtype": "float32", "engine": ENGINE},
        {"name": "decode-l4", "role": "decode", "accelerator_type": "L4",
         "dtype": "float32", "engine": ENGINE},
    ],
}


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"accelerator_type:A100": 1}})
    c.add_node(num_cpus=1, resources={"accelerator_type:L4": 1})
    ray.init(address=c.address, logging_level="ERROR")
    yield c
    ray.shutdown()
    c.shutdown()


def test_pools_land_on_their_accelerator_and_kv_crosses_nodes(cluster):
    pools = start_pools(load_config(CONFIG))
    [prefill], [decode] = pools.workers["prefill-a100"], pools.workers["decode-l4"]
    p_info, d_info = ray.get([prefill.info.remote(), decode.info.remote()])
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    assert "accelerator_type:A100" in nodes[p_info["node_id"]]
    assert "accelerator_type:L4" in nodes[d_info["node_id"]]
    assert p_info["node_id"] != d_info["node_id"]

    rng = random.Random(3)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (30, 75)]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    expected = [o.token_ids for o in
                Engine("tiny:qwen3", dtype="float32", **ENGINE).generate(prompts, params)]
    got = []
    for i, p in enumerate(prompts):
        stream = decode.generate.options(num_returns="streaming").remote(f"x{i}", p, params,
                                                                          prefill)
        got.append([ray.get(r) for r in stream][-1])
    assert [o.token_ids for o in got] == expected
    assert [o.metrics.prefill_path for o in got] == ["disaggregated"] * 2
    # The decode worker listens where other nodes reach it: its node's IP, as Ray knows it.
    host = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}[d_info["node_id"]]
    request_address, _ = ray.get(decode.request_endpoint.remote())
    assert [a.rsplit(":", 1)[0] for a in (d_info["kv_address"], request_address)] == [host] * 2
    assert ray.get(decode.block_violations.remote()) == []
    assert ray.get(prefill.block_violations.remote()) == []


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ({"pools": [{"name": "p", "role": "prefill"}]}, "decode or both"),
        ({"pools": [{"name": "d", "role": "decoder"}]}, "role"),
        ({"pools": [{"name": "d", "role": "decode", "replicas": -1}]}, "replicas"),
        ({"pools": [{"name": "d", "role": "decode", "device": "cuda"}]}, "num_gpus"),
        ({"pools": [{"name": "d", "role": "decode"}, {"name": "d", "role": "both"}]}, "unique"),
        ({"poolz": []}, "poolz"),
        ({"pools": [{"name": "d", "role": "decode", "replicas": 2, "cpu_cores": [0]}]},
         "cpu_cores"),
        ({"pools": [{"name": "p", "role": "prefill", "cpu_cores": [1]},
                    {"name": "d", "role": "decode", "cpu_cores": [1]}]}, "overlap"),
    ],
)
def test_bad_config_says_what_to_fix(raw, says):
    with pytest.raises(ConfigError, match=says):
        load_config(raw)


def test_workers_on_one_cpu_box_get_disjoint_cores_at_full_priority(cluster):
    pools = start_pools(load_config({
        "model": "tiny:llama",
        "pools": [{"name": "p", "role": "prefill", "cpu_cores": [0], "num_cpus": 1,
                   "accelerator_type": "A100"},
                  {"name": "d", "role": "decode", "cpu_cores": [1], "num_cpus": 1,
                   "accelerator_type": "L4"}],
    }))
    infos = ray.get([w.info.remote() for ws in pools.workers.values() for w in ws])
    assert [i["cpu_affinity"] for i in infos] == [[0], [1]]
    assert [i["niceness"] for i in infos] == [0, 0]  # not Ray's default 15 for workers


def test_yaml_file_round_trip(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("model: tiny:llama\npools:\n  - {name: both, role: both, replicas: 2}\n")
    cfg = load_config(path)
    assert cfg.pools[0].replicas == 2 and cfg.model == "tiny:llama"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
