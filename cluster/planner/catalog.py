"""What each accelerator offers the cost model: peak bf16 FLOP/s, HBM bandwidth, memory, NIC, price.

Figures are the vendors' published dense bf16 peaks (no sparsity) and HBM bandwidths; prices are
on-demand cloud list prices per GPU-hour (they vary by provider: override them, or add devices,
with a YAML file `{gpus: {NAME: {price_per_hour: ...}}}`). Names are Ray's `accelerator_type`
names, so a planned pool's `accelerator_type` is the name it was planned with. A CPU machine is
never described from a catalog: `cost.device_from_profile` derives one from a measured profile.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from baton.errors import ConfigError
from baton.validation import read_yaml

TFLOPS = 1e12
TB = 1e12
GB = 1e9
GBIT = 1e9 / 8  # bytes per second in one Gbit/s


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One device (a GPU, or a CPU worker measured by a profile) as the cost model sees it.

    `flops` and `mem_bw` are peaks for a GPU and measured effective rates for a CPU profile
    (whose efficiencies are then 1); `nic_bw` is the bytes/s one device's share of the network
    carries between machines (KV transfer).
    """

    name: str
    flops: float  # FLOP/s, bf16 dense
    mem_bw: float  # bytes/s
    memory: float  # bytes
    nic_bw: float  # bytes/s
    price_per_hour: float  # $ per device-hour
    kind: str = "gpu"  # gpu | cpu

    def __post_init__(self) -> None:
        for f in ("flops", "mem_bw", "memory", "nic_bw"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"device {self.name}: {f} must be > 0, got {getattr(self, f)}")
        if self.price_per_hour < 0:
            raise ConfigError(f"device {self.name}: price_per_hour must be >= 0")


GPUS: dict[str, DeviceSpec] = {g.name: g for g in (
    DeviceSpec("H100", 989 * TFLOPS, 3.35 * TB, 80 * GB, 400 * GBIT, 4.76),
    DeviceSpec("H200", 989 * TFLOPS, 4.8 * TB, 141 * GB, 400 * GBIT, 5.50),
    DeviceSpec("A100-80G", 312 * TFLOPS, 2.039 * TB, 80 * GB, 200 * GBIT, 2.20),
    DeviceSpec("A100-40G", 312 * TFLOPS, 1.555 * TB, 40 * GB, 200 * GBIT, 1.80),
    DeviceSpec("L40S", 362 * TFLOPS, 0.864 * TB, 48 * GB, 100 * GBIT, 1.20),
    DeviceSpec("L4", 121 * TFLOPS, 0.300 * TB, 24 * GB, 50 * GBIT, 0.50),
    DeviceSpec("A10G", 70 * TFLOPS, 0.600 * TB, 24 * GB, 25 * GBIT, 1.01),
)}
# Names people type for the same parts.
ALIASES = {"A100": "A100-80G", "A100-80GB": "A100-80G", "A100-40GB": "A100-40G"}
_UNITS = {"flops": TFLOPS, "mem_bw": TB, "memory": GB, "nic_bw": GBIT}
# A catalog YAML entry's keys: the figure in human units (TFLOP/s, TB/s, GB, Gbit/s) or a price.
_YAML_KEYS = {"tflops": "flops", "mem_bw_tbps": "mem_bw", "memory_gb": "memory",
              "nic_gbps": "nic_bw", "price_per_hour": "price_per_hour"}


class Catalog:
    """The GPUs a plan may use: the built-in table, with a user's overrides applied."""

    def __init__(self, gpus: dict[str, DeviceSpec] | None = None):
        self.gpus = dict(GPUS if gpus is None else gpus)

    def get(self, name: str) -> DeviceSpec:
        """The device of that name (or alias); `ConfigError` listing the known ones if unknown."""
        key = ALIASES.get(name, name)
        if key not in self.gpus:
            raise ConfigError(f"unknown GPU {name!r}; choose from {', '.join(sorted(self.gpus))} "
                              "or describe it in a catalog YAML (--catalog)")
        return self.gpus[key]

    def names(self) -> list[str]:
        return sorted(self.gpus)

    @classmethod
    def load(cls, path: str | Path | None) -> Catalog:
        """The built-in catalog with the YAML file's entries merged in (None: built-in only).

        Each entry under `gpus:` overrides fields of a known GPU (e.g. its price) or, with every
        figure given, adds a new one."""
        cat = cls()
        if path is None:
            return cat
        p = Path(path)
        raw = read_yaml(p, "catalog file")
        entries = raw.get("gpus") if isinstance(raw, dict) else None
        if not isinstance(entries, dict):
            raise ConfigError(f"catalog file {p} needs a `gpus:` mapping of name -> figures")
        for raw_name, figures in entries.items():
            name = ALIASES.get(str(raw_name), str(raw_name))
            cat.gpus[name] = _merge(cat.gpus.get(name), name, figures or {})
        return cat


def _merge(base: DeviceSpec | None, name: str, figures: dict[str, Any]) -> DeviceSpec:
    unknown = set(figures) - set(_YAML_KEYS)
    if unknown:
        raise ConfigError(f"catalog entry {name}: unknown keys {sorted(unknown)}; "
                          f"use {sorted(_YAML_KEYS)}")
    values: dict[str, Any] = {}
    for key, value in figures.items():
        field = _YAML_KEYS[key]
        try:
            values[field] = float(value) * _UNITS.get(field, 1.0)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"catalog entry {name}: {key} must be a number") from exc
    if base is not None:
        return replace(base, **values)
    missing = [k for k, f in _YAML_KEYS.items() if f not in values]
    if missing:
        raise ConfigError(f"catalog entry {name} is a new GPU: give {sorted(missing)} too")
    known = {f.name for f in fields(DeviceSpec)}
    return DeviceSpec(name=name, **{k: v for k, v in values.items() if k in known})
