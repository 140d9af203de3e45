"""The Dockerfile builds the image the chart runs: the same Ray, and every Baton package in it.

No container runtime runs here, so the image itself is never built in CI; these checks catch the
two mistakes that would break a deployment after a rebuild."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_the_image_runs_the_ray_version_the_chart_declares() -> None:
    tag = re.search(r"^ARG RAY_TAG=(\S+)$", _dockerfile(), re.M)
    assert tag, "the Dockerfile names its Ray base image in ARG RAY_TAG"
    values = yaml.safe_load((ROOT / "helm" / "baton" / "values.yaml").read_text())
    assert tag.group(1).split("-")[0] == values["ray"]["version"]


def test_every_package_directory_is_copied_into_the_image() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dirs = {path.split("/")[0] for path in project["tool"]["setuptools"]["package-dir"].values()}
    copied = set(re.findall(r"^COPY \S+ (\S+) \1$", _dockerfile(), re.M))
    assert dirs <= copied, f"not copied into the image: {sorted(dirs - copied)}"
