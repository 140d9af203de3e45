"""Write the `cluster:` part of the chart's values.schema.json from Baton's own config model.

    python helm/generate_schema.py           # rewrite helm/baton/values.schema.json
    python helm/generate_schema.py --check   # exit 1 if the committed schema is stale

`cluster:` is a Baton cluster config (`baton.cluster.config.ClusterConfig`), so its schema is
that pydantic model's JSON schema (titles and docstrings left out), with one tightening the chart
needs: pools must be given and non-empty. The rest of values.schema.json is written by hand and
kept as it is.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from baton.cluster.config import ClusterConfig

SCHEMA = Path(__file__).resolve().parent / "baton" / "values.schema.json"
FIX_COMMAND = "python helm/generate_schema.py"

log = logging.getLogger("helm.generate_schema")


def _strip(node: Any) -> Any:
    """The schema without titles and descriptions (the config module documents the fields)."""
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items()
                if k not in ("title", "description") or not isinstance(v, str)}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def cluster_schema() -> tuple[dict[str, Any], dict[str, Any]]:
    """(the schema of `cluster:`, the definitions it refers to as #/$defs/...)."""
    schema = _strip(ClusterConfig.model_json_schema())
    defs = schema.pop("$defs")
    schema["required"] = ["pools"]
    schema["properties"]["pools"]["minItems"] = 1
    schema["properties"]["pools"].pop("default", None)
    return schema, defs


def render(current: dict[str, Any]) -> str:
    """values.schema.json with its `cluster` part generated, the rest as in `current`."""
    cluster, defs = cluster_schema()
    out = dict(current)
    out["properties"] = {**current["properties"], "cluster": cluster}
    out["$defs"] = defs
    return json.dumps(out, indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the schema is stale")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    text = SCHEMA.read_text()
    fresh = render(json.loads(text))
    if args.check:
        if fresh != text:
            log.error("%s is stale: run %s", SCHEMA, FIX_COMMAND)
            return 1
        return 0
    SCHEMA.write_text(fresh)
    log.info("wrote %s", SCHEMA)
    return 0


if __name__ == "__main__":
    sys.exit(main())
