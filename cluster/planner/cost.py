"""Per (device, model) cost model: how long one engine iteration and one KV transfer take.

An iteration runs `p` prompt tokens (chunks) and `n` decode tokens in one forward pass. Its
compute is 2 FLOPs per active weight per token plus attention over the context; its memory
traffic is the weights once (the experts the tokens route to, for MoE) plus the KV it reads.
On a GPU the two overlap (time = overhead + max(compute, memory), the roofline: decode is
memory-bound and barely grows with batch, prefill is compute-bound); on a CPU they mostly do not
(time = overhead + compute + memory: decode cost grows with batch, as measured here). Each term
carries an efficiency (the share of the peak that is reached), fitted to a measured profile
(`calibrate`) or, for GPUs without one, set to typical values.
A replica spans `tp` devices (tensor parallel): their FLOP/s, bandwidth and memory add up, at
`TP_EFFICIENCY` for the all-reduces in between.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from baton.cluster.planner.catalog import DeviceSpec
from baton.cluster.planner.model import ModelProfile
from baton.cluster.planner.profile import Profile
from baton.errors import ConfigError

TP_EFFICIENCY = 0.9  # share of the devices' sum a tensor-parallel replica reaches
KV_MEMORY_FRACTION = 0.9  # of device memory, weights included, the engine may use
MAX_TP = 8
# A gRPC KV link's share of line rate (`baton bench kv`: 0.18-0.24 of raw TCP on loopback at
# 64 MiB with the v2 wire).
DEFAULT_LINK_EFFICIENCY = 0.2


@dataclass(frozen=True, slots=True)
class Efficiency:
    """Shares of the peaks an engine reaches, and what each iteration costs regardless."""

    compute: float = 0.5  # of peak FLOP/s (prefill MFU)
    memory: float = 0.75  # of HBM bandwidth (decode)
    # Attention FLOPs run at this share of the matmul rate (CPU: far below 1, a profile says how
    # far; GPU kernels near 1).
    attention: float = 1.0
    # KV-cache reads reach this share of the weights' bandwidth (CPU decode gathers the blocks
    # and converts them; GPU kernels read them in place, near 1).
    kv: float = 1.0
    overhead_s: float = 0.004  # per iteration: launches, sampling, scheduling
    # More per iteration that carries prompt tokens (a GPU replays decode steps from CUDA
    # graphs, and runs prompts eagerly, launch by launch; a GPU profile measures it).
    prefill_overhead_s: float = 0.0
    # Per KV handoff, beyond moving its bytes: the calls that set it up and bring the first token
    # back (a profile fitted to a served benchmark measures it; none assumed otherwise).
    handoff_s: float = 0.0
    # More per handoff whose decode worker is stepping when the prefill ends, per sequence it
    # holds: its admission and the KV receiver wait on the busy engine, and the worker's process
    # and host are the busier the more it decodes (a profile fitted to a served benchmark
    # measures it).
    handoff_busy_s: float = 0.0
    # Per request, before its prompt reaches an engine and after its tokens leave one: the API,
    # the router and the actor calls (a profile fitted to a served benchmark measures it).
    request_s: float = 0.0
    # A prefill worker's iterations take this many times a decode worker's (a CPU worker's KV
    # sender shares its core with the forward pass; a profile fitted to a served benchmark
    # measures it).
    prefill_scale: float = 1.0
    # Any other worker's iterations that carry prompt tokens take this many times the cost
    # model's (a profile fitted to a served benchmark measures it: there, long prompts served
    # where they decode took longer than the engine alone, beyond the step factor).
    prompt_scale: float = 1.0
    # Workers sharing one machine: while one runs an iteration with prompt chunks, the others'
    # decode runs go at 1 / (1 + this) of their speed (`ClusterSim`'s `host_contention`).
    host_contention: float = 0.0
    per_seq_s: float = 0.0  # per request in the batch (CPU: per-sequence Python work)
    link: float = DEFAULT_LINK_EFFICIENCY  # of NIC bandwidth a KV transfer reaches
    overlap: bool = True  # compute and memory overlap (GPU) or add up (CPU)


class CostModel:
    """One replica of `model` on `tp` devices of one type: iteration and transfer times."""

    def __init__(self, device: DeviceSpec, model: ModelProfile, tp: int = 1,
                 eff: Efficiency | None = None, kv_memory: float | None = None):
        self.device = device
        self.model = model
        self.tp = tp
        self.eff = eff or Efficiency()
        scale = tp * (TP_EFFICIENCY if tp > 1 else 1.0)
        self._flops = device.flops * self.eff.compute * scale
        self._bw = device.mem_bw * self.eff.memory * scale
        self._kv_bytes = model.kv_bytes_per_token / self.eff.kv  # per token, at weights' rate
        free = (kv_memory if kv_memory is not None
                else device.memory * tp * KV_MEMORY_FRACTION - model.weight_bytes)
        self.kv_capacity_tokens = int(free // model.kv_bytes_per_token)
        if self.kv_capacity_tokens < 1:
            raise ConfigError(f"{model.name} ({model.weight_bytes / 1e9:.1f} GB of weights) does "
                              f"not fit {tp} x {device.name} with room for its KV cache; use more "
                              "or larger devices per replica")
        self._dense_bytes = model.weight_bytes_read(1 << 30) if not model.num_experts else None
        # `attention_flops` per token of context, at attention's share of the matmul rate.
        self._attention = 4 * model.num_layers * model.q_dim / self.eff.attention

    @property
    def price_per_hour(self) -> float:
        return self.device.price_per_hour * self.tp

    @property
    def link_bytes_per_s(self) -> float:
        return self.device.nic_bw * self.tp * self.eff.link

    def iteration(self, prefill_tokens: int, prefill_context: float, decode_n: int,
                  decode_context: float, prefill_seqs: int = 1,
                  decode_tokens: float | None = None) -> float:
        """Seconds for one forward pass: `prefill_tokens` prompt tokens (of `prefill_seqs`
        requests) whose attention spans `prefill_context` (sum over tokens of the positions they
        attend to) and `decode_n` decoding requests holding `decode_context` tokens of KV, which
        compute `decode_tokens` tokens (default one each; more when they verify drafts)."""
        m = self.model
        tokens = prefill_tokens + (decode_n if decode_tokens is None else decode_tokens)
        verify = 1 if decode_tokens is None or not decode_n else decode_tokens / decode_n
        flops = (m.flops_per_token * tokens
                 + self._attention * (prefill_context + verify * decode_context))
        weights = (self._dense_bytes if self._dense_bytes is not None
                   else m.weight_bytes_read(tokens))
        mem = weights + self._kv_bytes * (decode_context + prefill_tokens)
        c, b = flops / self._flops, mem / self._bw
        seqs = decode_n + (prefill_seqs if prefill_tokens else 0)
        fixed = self.eff.overhead_s + (self.eff.prefill_overhead_s if prefill_tokens else 0.0)
        return fixed + self.eff.per_seq_s * seqs + (max(c, b) if self.eff.overlap else c + b)

    def decode_step(self, n: int, context: float, tokens: float | None = None) -> float:
        """`iteration(0, 0.0, n, context, decode_tokens=tokens)`, the same float, with less
        work: the simulator asks it for every decode run."""
        m = self.model
        if tokens is None or tokens == n:
            flops = m.flops_per_token * n + self._attention * context
            tokens = n
        else:  # each verified token attends over its request's context
            flops = m.flops_per_token * tokens + self._attention * (0.0 + tokens / n * context)
        weights = (self._dense_bytes if self._dense_bytes is not None
                   else m.weight_bytes_read(tokens))
        b = (weights + self._kv_bytes * context) / self._bw
        c = flops / self._flops
        eff = self.eff
        return eff.overhead_s + eff.per_seq_s * n + (max(c, b) if eff.overlap else c + b)

    def transfer(self, tokens: int, to: CostModel) -> float:
        """Seconds to move `tokens` tokens of KV to a replica `to` (the slower end's link)."""
        bw = min(self.link_bytes_per_s, to.link_bytes_per_s)
        return tokens * self.model.kv_bytes_per_token / bw


def min_tp(device: DeviceSpec, model: ModelProfile, min_kv_tokens: int = 16384) -> int:
    """The fewest devices (a power of two up to `MAX_TP`) a replica needs for the weights plus
    `min_kv_tokens` of KV; `ConfigError` when even `MAX_TP` is not enough."""
    need = model.weight_bytes + min_kv_tokens * model.kv_bytes_per_token
    tp = 1
    while tp <= MAX_TP:
        if device.memory * tp * KV_MEMORY_FRACTION >= need:
            return tp
        tp *= 2
    raise ConfigError(f"{model.name} needs {need / 1e9:.0f} GB (weights and {min_kv_tokens} tokens "
                      f"of KV): more than {MAX_TP} x {device.name}; choose larger GPUs or a "
                      "smaller or quantized model")


def _features(model: ModelProfile, profile: Profile) -> tuple[np.ndarray, ...]:
    """(matmul FLOPs, attention FLOPs, weight bytes, KV bytes, seconds, requests) of every
    profile point, prefill then decode."""
    rows = []
    for tokens, seconds in profile.prefill:
        rows.append((model.flops_per_token * tokens, model.attention_flops(tokens * tokens / 2),
                     model.weight_bytes_read(tokens), model.kv_bytes_per_token * tokens,
                     seconds, 1))
    for batch, context, seconds in profile.decode:
        ctx = batch * context
        rows.append((model.flops_per_token * batch, model.attention_flops(ctx),
                     model.weight_bytes_read(batch), model.kv_bytes_per_token * ctx, seconds,
                     batch))
    a = np.array(rows, dtype=float)
    return tuple(a[:, i] for i in range(6))


def _fit_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Theil-Sen: the median of the pairwise slopes, the median intercept. A profile measured
    on a real GPU has steps that paid for a first-time cost (an allocation, a plan) 10x over,
    and a least-squares line through them says nothing of the others."""
    i, j = np.triu_indices(len(x), 1)
    dx = x[j] - x[i]
    keep = dx != 0
    slope = float(np.median((y[j] - y[i])[keep] / dx[keep])) if keep.any() else 0.0
    intercept = float(np.median(y - slope * x))
    return max(slope, 1e-30), max(intercept, 0.0)


def calibrate(device: DeviceSpec, model: ModelProfile, profile: Profile,
              link: float | None = None) -> Efficiency:
    """Efficiencies of `device` fitted to a profile measured on it (GPU: prefill points fit
    compute, decode points fit memory; the overhead is the decode intercept, and what the
    prefill intercept adds to it is the prompt iterations' own)."""
    if len(profile.prefill) < 2 or len(profile.decode) < 2:
        raise ConfigError("a profile needs at least two prefill and two decode points")
    n_pre = len(profile.prefill)
    matmul, attention, weights, kv, secs, _ = _features(model, profile)
    flops, mem = matmul + attention, weights + kv
    slope_c, prefill_fixed = _fit_line(flops[:n_pre], secs[:n_pre])
    slope_m, overhead = _fit_line(mem[n_pre:], secs[n_pre:])
    return Efficiency(compute=min(1.0, 1 / (slope_c * device.flops)),
                      memory=min(1.0, 1 / (slope_m * device.mem_bw)), overhead_s=overhead,
                      prefill_overhead_s=max(prefill_fixed - overhead, 0.0),
                      link=link if link is not None else DEFAULT_LINK_EFFICIENCY, overlap=True)


def _nonnegative_fit(design: np.ndarray, secs: np.ndarray) -> np.ndarray:
    """Least squares in relative error (a 5 ms decode step counts as much as a 5 s prefill) with
    every coefficient >= 0: the best of the fits over subsets of the columns."""
    a, b = design / secs[:, None], np.ones_like(secs)
    best, best_err = np.zeros(design.shape[1]), np.inf
    cols = range(design.shape[1])
    for mask in itertools.product((False, True), repeat=design.shape[1]):
        keep = [c for c in cols if mask[c]]
        if not keep:
            continue
        coef, *_ = np.linalg.lstsq(a[:, keep], b, rcond=None)
        if (coef < 0).any():
            continue
        full = np.zeros(design.shape[1])
        full[keep] = coef
        err = float(np.sum((a @ full - b) ** 2))
        if err < best_err:
            best, best_err = full, err
    return best


def device_from_profile(profile: Profile, model: ModelProfile,
                        price_per_hour: float) -> tuple[DeviceSpec, Efficiency]:
    """A CPU worker as a device whose FLOP/s and bandwidth are the effective rates measured:
    seconds = overhead + requests x per-request cost + matmul FLOPs / F + attention FLOPs / A
    + weight bytes / B + KV bytes / K, fitted over every point (relative error, coefficients
    >= 0). Attention and KV reads get rates of their own: on a CPU both run far below the
    matmuls and weight reads (long prompts cost more than linearly; decode grows with context,
    the KV blocks gathered and converted). A dense model reads the same weights every step, so
    overhead and weight bytes trade off in the fit; predictions do not depend on the split.
    Every rate is then slowed by the profile's `serving_scale` (and a prefill worker's further by
    its `prefill_scale`, another worker's prompt iterations by its `prompt_scale`)."""
    matmul, attention, weights, kv, secs, seqs = _features(model, profile)
    design = np.column_stack([np.ones_like(matmul), seqs, matmul, attention, weights, kv])
    overhead, per_seq, per_flop, per_attention, per_byte, per_kv = (
        float(c) for c in _nonnegative_fit(design, secs))
    # A serving worker's step takes `serving_scale` times the engine's own: every term scales.
    k = profile.serving_scale
    overhead, per_seq, per_flop, per_attention, per_byte, per_kv = (
        k * c for c in (overhead, per_seq, per_flop, per_attention, per_byte, per_kv))
    per_flop, per_byte = max(per_flop, 1e-30), max(per_byte, 1e-30)
    device = DeviceSpec(name=profile.device, flops=1 / per_flop,
                        mem_bw=1 / per_byte,
                        memory=model.weight_bytes + profile.kv_cache_memory,
                        nic_bw=profile.kv_link_bytes_per_s, price_per_hour=price_per_hour,
                        kind="cpu")
    return device, Efficiency(compute=1.0, memory=1.0,
                              attention=per_flop / per_attention if per_attention else 1e30,
                              kv=per_byte / per_kv if per_kv else 1e30,
                              overhead_s=overhead, per_seq_s=per_seq,
                              handoff_s=profile.handoff_s, request_s=profile.request_s,
                              handoff_busy_s=profile.handoff_busy_s,
                              prefill_scale=profile.prefill_scale,
                              prompt_scale=profile.prompt_scale,
                              host_contention=profile.host_contention,
                              link=1.0, overlap=False)
