"""The engine's options: one pydantic model, checked wherever they enter, without torch.

A pool's `engine:` options in a cluster YAML are parsed into it with the rest of the config, so a
typo fails `baton up -c` (and `load_config`) before any actor starts; `Engine(model, **options)`
builds one the same way. The one check that needs torch (CUDA present on this machine) is made
where the engine starts, since the machine that reads a config may not be the one that runs it.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from baton.errors import ConfigError
from baton.speculation import MAX_SPECULATIVE_TOKENS, METHODS
from baton.validation import must_be, one_of, problems

TorchDtype = Literal["bfloat16", "float16", "float32"]
Dtype = Literal["auto", "bfloat16", "float16", "float32"]  # auto: this machine's fastest
Quantization = Literal["int8", "int4"]
DTYPE_NAMES: tuple[str, ...] = get_args(TorchDtype)
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
INT4_GROUP_SIZES = (32, 64, 128)
GiB = 1 << 30
MoEPolicy = Literal["lru", "lfu", "lookahead", "trace", "learned", "pregate"]
MoETier = Literal["host", "disk"]
MOE_POLICIES: tuple[str, ...] = get_args(MoEPolicy)
BUDGET_WORDS = "bytes (an integer >= 1) or a fraction of all experts (a number in (0, 1])"


class MoEOffloadConfig(BaseModel):
    """Mixture-of-Experts offload: experts live in `tier` (host memory, or files on disk under
    `dir`, a temporary directory when None, read directly where the filesystem allows) and a
    device cache of `budget` (bytes, or a fraction of all experts) holds the resident ones,
    evicted and prefetched by `policy`.
    Policy `learned` reads its routing-path predictor from `predictor` (a file written by
    `baton train-experts` for this model).

    A budget below one expert, or offload on a dense model, fails where the engine loads the
    model (the expert size is known only then).
    """

    model_config = ConfigDict(extra="forbid")

    budget: Annotated[int | float, one_of(BUDGET_WORDS)]
    policy: MoEPolicy = "lru"
    tier: MoETier = "host"
    dir: str | None = None
    predictor: str | None = Field(None, validate_default=True)

    @field_validator("budget")
    @classmethod
    def _positive(cls, budget: int | float) -> int | float:
        if isinstance(budget, bool) or (isinstance(budget, float) and not 0 < budget <= 1) or \
                (isinstance(budget, int) and budget < 1):
            raise must_be(BUDGET_WORDS)
        return budget

    @field_validator("predictor")
    @classmethod
    def _predictor_for_learned(cls, predictor: str | None, info: ValidationInfo) -> str | None:
        policy = info.data.get("policy")
        if policy == "learned" and not predictor:
            raise ValueError("policy 'learned' needs predictor: the path of a file written by "
                             "`baton train-experts --model <this model> --out <path>`")
        if predictor and policy not in (None, "learned"):
            raise ValueError(f"predictor is read by policy 'learned' only; set policy: learned "
                             f"or drop predictor (policy is {policy!r})")
        return predictor

    @model_validator(mode="after")
    def _dir_for_disk(self) -> MoEOffloadConfig:
        if self.dir is not None and self.tier != "disk":
            raise ValueError("dir is where the disk tier writes experts; set "
                             "tier: disk or drop dir")
        return self


class EngineConfig(BaseModel):
    """Everything that shapes one engine; validated on construction.

    `dtype` "auto" (the default) is this machine's fastest: measured once on a CPU, bf16 (else
    fp16) on CUDA (see `baton.actors.dtype_choice`).
    `kv_cache_memory` (bytes) sizes the paged cache unless `num_kv_blocks` is given.
    `num_threads` pins torch's intra-op threads (two engines on one CPU box get disjoint counts).
    `quantization` ("int8" per channel, "int4" in groups of `quant_group_size`) stores the model's
    linear weights (not embeddings or the output head) quantized; activations keep `dtype`.
    `quant_group_size` None takes the largest of `INT4_GROUP_SIZES` that divides every quantized
    layer's input size; a given one that does not fails where the model loads, naming the layer.
    `methods` are the acceleration methods requests may ask for (None: `none`, `ngram`,
    `lookahead`, `layerskip`, plus `draft` / `medusa` when `draft_model` / `medusa_heads` are
    given); `max_speculative_tokens` caps a draft; `layerskip_layers` None calibrates the depth.
    `moe_offload` (see `MoEOffloadConfig`) keeps a MoE model's experts off the device.
    `cuda_graphs`: on CUDA, decode steps of up to `max_num_seqs` requests replay CUDA graphs
    captured per batch-size bucket (`actors/cuda_graphs.py`); False runs every step eagerly.
    `from_options` raises `ConfigError` naming each bad or unknown option; inside a larger model
    (a pool's `engine:`) a bad option fails that model's validation, under its path.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = "default"
    dtype: Dtype = "auto"
    device: str = "cpu"
    num_threads: int | None = Field(None, ge=1)
    block_size: int = Field(16, ge=1)
    kv_cache_memory: int = Field(1 * GiB, ge=1)
    num_kv_blocks: int | None = Field(None, ge=1)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(512, ge=1)
    long_prefill_token_threshold: int = Field(0, ge=0)
    max_model_len: int | None = Field(None, ge=1)
    enable_prefix_caching: bool = True
    seed: int = 0
    quantization: Quantization | None = None
    quant_group_size: int | None = None
    methods: list[str] | None = None
    max_speculative_tokens: int = Field(8, ge=1, le=MAX_SPECULATIVE_TOKENS)
    draft_model: str | None = None
    medusa_heads: str | None = None
    layerskip_layers: int | None = Field(None, ge=1)
    moe_offload: MoEOffloadConfig | None = None
    cuda_graphs: bool = True

    @classmethod
    def from_options(cls, **options: Any) -> EngineConfig:
        """The config these options make, or a `ConfigError` that names every bad one."""
        try:
            return cls.model_validate(options)
        except ValidationError as exc:
            raise _config_error(exc) from exc

    @field_validator("device")
    @classmethod
    def _cpu_or_cuda(cls, device: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
            raise must_be("'cpu' or 'cuda[:N]'")
        return device

    @field_validator("quant_group_size")
    @classmethod
    def _int4_group(cls, size: int | None, info: ValidationInfo) -> int | None:
        if info.data.get("quantization") == "int4" and size not in (None, *INT4_GROUP_SIZES):
            raise must_be(f"one of {INT4_GROUP_SIZES} with int4")
        return size


    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: list[str] | None) -> list[str] | None:
        if methods is not None:
            unknown = sorted(set(methods) - set(METHODS))
            if unknown:
                raise must_be(f"a list of {list(METHODS)} (unknown: {unknown})")
        return methods

    @model_validator(mode="after")
    def _files_for_methods(self) -> EngineConfig:
        wanted = set(self.methods or ())
        if "draft" in wanted and not self.draft_model:
            raise ValueError("method 'draft' needs draft_model (a model path or id)")
        if "medusa" in wanted and not self.medusa_heads:
            raise ValueError("method 'medusa' needs medusa_heads (a directory from "
                             "`baton train-heads`)")
        return self


def _config_error(exc: ValidationError) -> ConfigError:
    found = problems(exc)
    unknown = sorted(p.field for p in found if p.kind == "extra_forbidden")
    said = [p.message for p in found if p.kind != "extra_forbidden"]
    if unknown:
        said.insert(0, f"unknown engine option(s) {unknown}; the options are "
                       f"{', '.join(EngineConfig.model_fields)}")
    return ConfigError("; ".join(said))
