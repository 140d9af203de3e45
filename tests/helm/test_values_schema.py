"""values.schema.json's `cluster:` part is Baton's own ClusterConfig schema, so helm refuses
exactly the cluster configs `baton up -c` would (a stale copy fails here: regenerate it)."""

from __future__ import annotations

import importlib.util
import json

from tests.helm.conftest import CHART, ROOT

spec = importlib.util.spec_from_file_location("generate_schema",
                                              ROOT / "helm" / "generate_schema.py")
assert spec is not None and spec.loader is not None
generate_schema = importlib.util.module_from_spec(spec)
spec.loader.exec_module(generate_schema)


def test_committed_schema_matches_the_cluster_config_model():
    text = (CHART / "values.schema.json").read_text()
    assert generate_schema.render(json.loads(text)) == text, (
        f"values.schema.json is stale: run {generate_schema.FIX_COMMAND}")


def test_schema_requires_a_non_empty_pool_list():
    schema = json.loads((CHART / "values.schema.json").read_text())
    cluster = schema["properties"]["cluster"]
    assert cluster["required"] == ["pools"]
    assert cluster["properties"]["pools"]["minItems"] == 1
    assert cluster["additionalProperties"] is False  # typos fail, as in load_config
