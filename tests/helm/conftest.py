"""Render the Baton chart with the real helm binary and validate what it renders.

Core kinds are checked against Kubernetes' own schemas (`kubernetes-validate`, strict: an unknown
field fails), RayCluster and RayJob against KubeRay's CRD schemas vendored in `schemas/` (made
strict the same way: the API server's strict field validation rejects unknown fields too).
"""

from __future__ import annotations

import base64
import copy
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "baton"
MIXED = CHART / "examples" / "mixed-gpu.yaml"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
KUBERNETES_VERSION = "1.35"  # the helm shipped by `make setup` is built against 1.35
CRDS = {("ray.io/v1", "RayCluster"): "raycluster-v1.json",
        ("ray.io/v1", "RayJob"): "rayjob-v1.json"}
RELEASE = "baton"


def helm_binary() -> str:
    """The helm `make setup` puts next to the venv's python, else one on PATH."""
    local = Path(sys.executable).parent / "helm"
    found = str(local) if local.exists() else shutil.which("helm")
    if found is None:
        pytest.fail("no helm binary: run `make setup` (it installs .venv/bin/helm)")
    return found


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=60)


@dataclass
class Rendered:
    """The manifests `helm template` produced, with lookups by kind and name."""

    docs: list[dict[str, Any]]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, suffix: str = "") -> dict[str, Any]:
        found = [d for d in self.all(kind) if d["metadata"]["name"].endswith(suffix)]
        assert len(found) == 1, f"{len(found)} {kind} named *{suffix}: " + ", ".join(
            d["metadata"]["name"] for d in self.all(kind))
        return found[0]

    def secret_value(self, name: str, key: str) -> str:
        secret = next(d for d in self.all("Secret") if d["metadata"]["name"] == name)
        return base64.b64decode(secret["data"][key]).decode()


def template(values_files: tuple[Path, ...],
             sets: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    return helm("template", RELEASE, str(CHART),
                *[a for f in values_files for a in ("-f", str(f))],
                *[a for s in sets for a in ("--set", s)])


def render(*values_files: Path, sets: tuple[str, ...] = ()) -> Rendered:
    """`helm template` of the chart; fails the test with helm's message if it fails."""
    out = template(values_files, sets)
    assert out.returncode == 0, out.stderr
    return Rendered([d for d in yaml.load_all(out.stdout, Loader=yaml.CSafeLoader) if d])


def render_error(*values_files: Path, sets: tuple[str, ...] = ()) -> str:
    """helm's error message for values that must not render."""
    out = template(values_files, sets)
    assert out.returncode != 0, "helm template rendered values it should have refused"
    return out.stderr


def _strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists the known ones."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def crd_validator(file: str) -> jsonschema.Draft7Validator:
    crd = json.loads((SCHEMAS / file).read_text())
    schema = _strict(crd["openAPIV3Schema"])
    # apiVersion, kind and metadata are the API server's, checked for every kind alike.
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def validate(doc: dict[str, Any]) -> str:
    """Validate one manifest against its kind's schema; returns what checked it."""
    crd = CRDS.get((doc["apiVersion"], doc["kind"]))
    if crd is not None:
        errors = sorted(crd_validator(crd).iter_errors(copy.deepcopy(doc)), key=str)
        assert not errors, f"{doc['kind']} {doc['metadata']['name']}: " + "; ".join(
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5])
        return f"KubeRay CRD {crd}"
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: "
                    f"{'/'.join(map(str, exc.absolute_path))}: {exc.message}")
    return f"Kubernetes {KUBERNETES_VERSION} schema"


@pytest.fixture(scope="module")
def default_render() -> Rendered:
    return render()


@pytest.fixture(scope="module")
def mixed_render() -> Rendered:
    return render(MIXED)


def load_values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())
