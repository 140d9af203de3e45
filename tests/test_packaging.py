"""A non-editable install carries every subpackage (the package-dir mapping is easy to break)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from baton.kernels import cpu_decode

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_every_subpackage(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    wheel = next(tmp_path.glob("baton-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg in ("baton", "baton/actors", "baton/router", "baton/cluster", "baton/kernels",
                "baton/protos", "baton/ops", "baton/ops/bench"):
        assert f"{pkg}/__init__.py" in names, f"{pkg} missing from the wheel"
    code_dirs = {"actors": "actors", "router": "router", "cluster": "cluster",
                 "baton_kernels": "kernels", "protos": "protos", "ops": "ops"}
    for d, package in code_dirs.items():
        for src in (ROOT / d).rglob("*.py"):
            rel = src.relative_to(ROOT / d)
            assert f"baton/{package}/{rel.as_posix()}" in names, f"{d}/{rel} missing from the wheel"
    for source in cpu_decode.SOURCES:  # the CPU decode kernels are built from them
        assert f"baton/kernels/{source.name}" in names
    assert any(n.endswith("entry_points.txt") for n in names)
