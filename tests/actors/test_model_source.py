"""Model sources: the embedded default's one-time conversion, GGUF files, directories, errors."""

from __future__ import annotations

import json
import shutil

import pytest

from baton.actors import model_source
from baton.actors.engine import Engine
from baton.errors import ModelLoadError, ModelNotFoundError


def test_default_model_is_converted_once_into_the_cache():
    src = model_source.resolve("default")
    assert src.kind == "default" and src.name == "SmolLM2-135M-Instruct"
    assert (src.path / "model.safetensors").is_file()
    cfg = json.loads((src.path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    stamp = (src.path / "model.safetensors").stat().st_mtime_ns
    assert model_source.resolve(None).path == src.path
    assert (src.path / "model.safetensors").stat().st_mtime_ns == stamp  # not converted again


def test_gguf_file_and_converted_directory_both_load():
    gguf = model_source.default_gguf_path()
    via_file = model_source.resolve(str(gguf))
    assert via_file.kind == "gguf" and via_file.path == model_source.resolve("default").path
    local = model_source.resolve(str(via_file.path))
    assert local.kind == "local"  # the converted directory


@pytest.mark.parametrize(
    "spec",
    ["/no/such/model", "./missing-dir", "missing.gguf", "tiny:transformerzz", "a/b/c"],
)
def test_unknown_models_raise_not_found(spec):
    with pytest.raises(ModelNotFoundError) as info:
        Engine(spec)
    assert repr(spec.removeprefix("tiny:")) in info.value.message  # says what it looked for


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        model_source.resolve(str(tmp_path))


def test_hub_id_without_network_or_cache_is_not_found(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The hub library read the variable when it was imported: tell it too, or it tries the
    # network (and waits out its timeouts where there is none).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="hub"):
        Engine("baton-test/not-a-real-model")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_gguf_raises_a_load_error(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("BATON_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    if damage == "garbage":
        bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 512)
    else:
        with model_source.default_gguf_path().open("rb") as f:
            bad.write_bytes(f.read(1 << 20))
    with pytest.raises(ModelLoadError, match="GGUF") as info:
        Engine(str(bad))
    assert "broken.gguf" in info.value.message
    # Nothing half-written is left to be mistaken for a converted model later.
    leftovers = list((tmp_path / "cache" / "models").glob("*"))
    assert all(not (p / "config.json").exists() for p in leftovers)


def test_cache_dir_follows_baton_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BATON_CACHE", str(tmp_path))
    gguf = tmp_path / "copy.gguf"
    shutil.copy(model_source.default_gguf_path(), gguf)
    target = model_source.convert_gguf(gguf)
    assert target.parent == tmp_path / "models"
    assert (target / "tokenizer.json").is_file()
    # (That a converted directory serves as a model, every default-model engine shows.)


def test_models_with_attention_softcapping_are_refused(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from baton.actors.tiny import tiny_tokenizer

    cfg = AutoConfig.for_model("gemma2", vocab_size=257, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                               head_dim=16)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="softcapping"):
        Engine(str(tmp_path))
