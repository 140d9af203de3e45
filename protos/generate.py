"""Regenerate the gRPC stubs from `protos/*.proto`, or check that the committed ones are fresh.

    python protos/generate.py           # rewrite <name>_pb2.py, _pb2.pyi, _pb2_grpc.py in protos/
    python protos/generate.py --check   # exit 1 if any committed stub differs from a fresh build

The stubs are committed next to their `.proto` files and imported as `baton.protos.<name>_pb2`,
so protoc's flat `import kv_link_pb2 as kv__link__pb2` lines are rewritten into relative imports.
The output embeds the protobuf and grpcio-tools versions that generated it, so `--check` compares
against the versions installed here: a different grpcio-tools reads as stale.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
FIX_COMMAND = "python protos/generate.py"

log = logging.getLogger("protos.generate")


def proto_files(proto_dir: Path) -> list[Path]:
    """The `.proto` sources, sorted so the output never depends on directory order."""
    return sorted(proto_dir.glob("*.proto"))


def stub_names(protos: list[Path]) -> list[str]:
    """File names of every stub the given sources produce."""
    return [p.stem + suffix for p in protos for suffix in SUFFIXES]


def committed_stubs(proto_dir: Path) -> set[str]:
    """Stub-shaped files already in the folder, whether or not a source still produces them."""
    return {p.name for suffix in SUFFIXES for p in proto_dir.glob("*" + suffix)}


def fix_imports(text: str, modules: set[str]) -> str:
    """Turn `import x_pb2 as y` into `from . import x_pb2 as y` for modules generated here."""

    def repl(match: re.Match[str]) -> str:
        if match.group(1) not in modules:
            return match.group(0)
        return f"from . import {match.group(1)} as {match.group(2)}"

    return re.sub(r"^import (\w+) as (\w+)$", repl, text, flags=re.MULTILINE)


def run_protoc(proto_dir: Path, out_dir: Path) -> None:
    """Generate every stub of `proto_dir` into `out_dir`, imports fixed."""
    protos = proto_files(proto_dir)
    if not protos:
        raise SystemExit(f"no .proto files in {proto_dir}")
    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        # Names relative to the include path keep absolute paths out of the output.
        *(p.name for p in protos),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    modules = {p.stem + "_pb2" for p in protos} | {p.stem + "_pb2_grpc" for p in protos}
    for name in stub_names(protos):
        path = out_dir / name
        text = fix_imports(path.read_text(encoding="utf-8"), modules)
        path.write_bytes(text.encode("utf-8"))


def stale_files(proto_dir: Path, fresh_dir: Path) -> list[str]:
    """Committed stubs that differ from, are missing from, or are absent in the fresh build."""
    fresh = set(stub_names(proto_files(proto_dir)))
    stale = []
    for name in sorted(fresh | committed_stubs(proto_dir)):
        committed = proto_dir / name
        if (
            name not in fresh
            or not committed.is_file()
            or committed.read_bytes() != (fresh_dir / name).read_bytes()
        ):
            stale.append(name)
    return stale


def write(proto_dir: Path, fresh_dir: Path) -> list[str]:
    """Bring `proto_dir` in line with the fresh build; returns the files changed."""
    changed = stale_files(proto_dir, fresh_dir)
    for name in changed:
        generated = fresh_dir / name
        if generated.is_file():
            (proto_dir / name).write_bytes(generated.read_bytes())
        else:  # its .proto is gone
            (proto_dir / name).unlink()
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="compare with a fresh build; exit 1 if stale"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="baton-protos-") as tmp:
        fresh_dir = Path(tmp)
        run_protoc(PROTO_DIR, fresh_dir)
        if args.check:
            stale = stale_files(PROTO_DIR, fresh_dir)
            if stale:
                log.error("stale generated stubs in %s: %s", PROTO_DIR, ", ".join(stale))
                log.error("regenerate them with: %s", FIX_COMMAND)
                return 1
            log.info("generated stubs are up to date")
            return 0
        changed = write(PROTO_DIR, fresh_dir)
    log.info("updated: %s", ", ".join(changed) if changed else "nothing (already up to date)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
