"""`baton bench kv`: the KV link against raw TCP and Ray's object store, in one run.

Throughput: the same payload bytes (one request's KV, all layers, of the default model's shape)
cross loopback through Baton's gRPC KV link (end to end: pack, raw-bytes chunks on concurrent
unary calls, CRC32C, unpack into the receiver's blocks; and once more with the layers packed
beforehand), through a bare TCP socket into a preallocated buffer, and through Ray's object store
into another process. Repeats are interleaved, so noise from other processes lands on every
system alike. `ratios` holds the largest size's ratios, plus `grpc_vs_raw_tcp_4mib` when 4 MiB
was measured (a typical prompt's KV).

Overlap: a simulated prefill computes layer by layer and the link streams each layer as it is
ready; how much of the transfer time hides behind the compute.

Ratios, not absolute figures, are what to quote: these machines are shared and noisy.
"""

from __future__ import annotations

import itertools
import logging
import queue
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from baton.actors.host_memory import keep_freed_memory
from baton.actors.kv_cache import KVCacheSpec, PagedKVCache
from baton.actors.kv_link import KVReceiver, KVSender
from baton.actors.kv_transfer import pack_layer, payload_nbytes, unpack_layer
from baton.errors import ConfigError
from baton.ops.bench.kv_baselines import RawTCPLink, RayObjectStoreLink, expected_touch
from baton.ops.bench.machine import OtherCPUBusy, machine_info, warn_if_busy
from baton.ops.bench.report import run_and_report

log = logging.getLogger(__name__)

# The default model's KV shape (SmolLM2-135M: 30 layers, 3 KV heads of 64), paged as Baton pages.
SPEC = KVCacheSpec(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16,
                   dtype=torch.bfloat16)
SIZES_MIB = (1, 4, 16, 64)
REPORTED_MIB = 4  # besides the largest size, `ratios` names this one's link/TCP ratio
OVERLAP_MIB = 16
REPEATS = 15
TOKEN = "bench-kv"
TIMEOUT_S = 120.0
MATMUL_N = 256
MIB = 1 << 20

Layers = list[tuple[int, torch.Tensor]]


def blocks_for(size_mib: float) -> int:
    """Blocks whose KV (all layers) comes closest to `size_mib` (blocks are 360 KiB each)."""
    return max(1, round(size_mib * MIB / SPEC.bytes_per_block))


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _stats(seconds: Sequence[float], nbytes: int) -> dict[str, float]:
    best, median = min(seconds), statistics.median(seconds)
    return {"runs": len(seconds), "best_s": best, "median_s": median,
            "best_mib_s": nbytes / MIB / best, "median_mib_s": nbytes / MIB / median}


# -- Baton's link ---------------------------------------------------------------------------------


class LinkRig:
    """A receiver (its own gRPC server and thread pool) and a sender in this process.

    Source and destination caches hold `max_blocks`; a payload of `n` blocks goes from source
    blocks 0..n-1 to destination blocks n-1..0, a scatter as on a real decode worker.
    """

    def __init__(self, max_blocks: int):
        keep_freed_memory()  # as a worker process runs its link ends
        cpu = torch.device("cpu")
        self.src = PagedKVCache(SPEC, max_blocks, cpu)
        gen = torch.Generator().manual_seed(0)
        for t in (*self.src.keys, *self.src.values):
            t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
        self.receiver = KVReceiver(PagedKVCache(SPEC, max_blocks, cpu), token=TOKEN)
        self.sender = KVSender(self.receiver.address, TOKEN)
        self._ids = itertools.count()

    @staticmethod
    def block_ids(n: int) -> tuple[list[int], list[int]]:
        return list(range(n)), list(reversed(range(n)))

    def pack(self, n: int) -> Layers:
        src = torch.tensor(self.block_ids(n)[0])
        return [(i, pack_layer(self.src, i, src)) for i in range(SPEC.num_layers)]

    def pack_groups(self, n: int) -> Layers:
        """The layers packed as the sender groups them when all are ready at once."""
        return list(self.sender.packed_groups(self.src, self.block_ids(n)[0]))

    def unpack(self, n: int, layers: Layers) -> None:
        dst = torch.tensor(self.block_ids(n)[1])
        for i, payload in layers:
            unpack_layer(self.receiver.cache, i, dst, payload)

    def push_blocks(self, n: int) -> None:
        """`push_blocks` + `wait`: what one request's KV costs end to end."""
        src_ids, dst_ids = self.block_ids(n)
        tid = self._expect(dst_ids)
        self.sender.push_blocks(self.src, tid, tid, src_ids, dst_ids, timeout_s=TIMEOUT_S)
        self.receiver.wait(tid)

    def push(self, n: int, layers: Iterable[tuple[int, torch.Tensor]]) -> None:
        """`push` of layers packed elsewhere (beforehand, or by a producer thread) + `wait`."""
        dst_ids = self.block_ids(n)[1]
        tid = self._expect(dst_ids)
        self.sender.push(tid, tid, dst_ids, layers, SPEC, timeout_s=TIMEOUT_S)
        self.receiver.wait(tid)

    def delivered(self, n: int) -> bool:
        src_ids, dst_ids = self.block_ids(n)
        dst = self.receiver.cache
        return all(torch.equal(dst.keys[i][:, dst_ids], self.src.keys[i][:, src_ids])
                   and torch.equal(dst.values[i][:, dst_ids], self.src.values[i][:, src_ids])
                   for i in range(SPEC.num_layers))

    def close(self) -> None:
        self.sender.close()
        self.receiver.stop(None)

    def _expect(self, dst_ids: list[int]) -> str:
        tid = f"bench-{next(self._ids)}"
        self.receiver.expect(tid, tid, dst_ids, timeout_s=TIMEOUT_S)
        return tid


# -- throughput -----------------------------------------------------------------------------------


def measure_size(rig: LinkRig, tcp: RawTCPLink, store: RayObjectStoreLink, size_mib: float,
                 repeats: int) -> dict[str, Any]:
    """Every system on one payload size, repeats interleaved; the first (warm-up) run checked."""
    n = blocks_for(size_mib)
    packed = rig.pack(n)
    wire = b"".join(p.numpy().tobytes() for _, p in packed)
    arr = np.frombuffer(wire, dtype=np.uint8)
    nbytes = len(wire)
    if nbytes != payload_nbytes(SPEC, n) * SPEC.num_layers:
        raise RuntimeError(f"packed {nbytes} bytes for {n} blocks")
    systems: dict[str, Callable[[], Any]] = {
        "grpc_link": partial(rig.push_blocks, n),
        "grpc_link_prepacked": partial(rig.push, n, rig.pack_groups(n)),
        "raw_tcp": partial(tcp.send, wire),
        "ray_object_store": partial(store.send, arr),
    }
    rig.receiver.cache.keys[0].zero_()
    systems["grpc_link"]()
    if not rig.delivered(n):
        raise RuntimeError("the KV link delivered different bytes than were sent")
    systems["grpc_link_prepacked"]()
    tcp.send(wire)
    if tcp.buffer[:nbytes] != wire:
        raise RuntimeError("raw TCP delivered different bytes than were sent")
    if store.send(arr) != expected_touch(arr):
        raise RuntimeError("the Ray actor saw different bytes than were put")
    seconds: dict[str, list[float]] = {name: [] for name in systems}
    pack_s, unpack_s = [], []
    for _ in range(repeats):
        for name, fn in systems.items():
            seconds[name].append(_timed(fn))
        pack_s.append(_timed(partial(rig.pack, n)))
        unpack_s.append(_timed(partial(rig.unpack, n, packed)))
    stats = {name: _stats(s, nbytes) for name, s in seconds.items()}

    def ratio(a: str, b: str) -> float:
        return stats[a]["best_mib_s"] / stats[b]["best_mib_s"]

    return {
        "size_mib": size_mib, "blocks": n, "bytes": nbytes, "systems": stats,
        "pack_s": min(pack_s), "unpack_s": min(unpack_s),
        "ratios": {
            "grpc_vs_raw_tcp": ratio("grpc_link", "raw_tcp"),
            "grpc_vs_ray_object_store": ratio("grpc_link", "ray_object_store"),
            "grpc_prepacked_vs_raw_tcp": ratio("grpc_link_prepacked", "raw_tcp"),
        },
    }


# -- overlap --------------------------------------------------------------------------------------


class LayerCompute:
    """Stands in for one layer of prefill: a float32 matmul loop, calibrated to `target_s`."""

    def __init__(self, target_s: float):
        self.a = torch.randn(MATMUL_N, MATMUL_N)
        self.b = torch.randn(MATMUL_N, MATMUL_N)
        self.out = torch.empty(MATMUL_N, MATMUL_N)
        self.iters = 1
        for _ in range(5):
            self()
        one = statistics.median(_timed(self) for _ in range(30))
        self.iters = max(1, round(target_s / one))

    def __call__(self) -> None:
        for _ in range(self.iters):
            torch.mm(self.a, self.b, out=self.out)


def _prefill(rig: LinkRig, n: int,
             compute: Callable[[], Any]) -> Iterator[tuple[int, torch.Tensor]]:
    """Layer by layer: compute, then pack the layer's KV (what a prefill worker hands the link)."""
    src = torch.tensor(rig.block_ids(n)[0])
    for i in range(SPEC.num_layers):
        compute()
        yield i, pack_layer(rig.src, i, src)


def _streamed(rig: LinkRig, n: int, compute: Callable[[], Any]) -> None:
    """A producer thread runs the prefill and queues each layer; `push` sends them as they come."""
    feed: queue.Queue[tuple[int, torch.Tensor] | None] = queue.Queue()

    def produce() -> None:
        try:
            for item in _prefill(rig, n, compute):
                feed.put(item)
        finally:
            feed.put(None)

    def layers() -> Iterator[tuple[int, torch.Tensor]]:
        while (item := feed.get()) is not None:
            yield item

    producer = threading.Thread(target=produce, name="bench-prefill")
    producer.start()
    try:
        rig.push(n, layers())
    finally:
        producer.join()


def _overlap_rounds(rig: LinkRig, n: int, packed: Layers, compute: Callable[[], Any],
                    repeats: int) -> dict[str, Any]:
    """Compute alone, transfer alone, and both streamed, interleaved; the medians' overlap."""

    def compute_alone() -> None:
        for _ in _prefill(rig, n, compute):
            pass

    rounds: dict[str, list[float]] = {"compute_s": [], "transfer_s": [], "streamed_s": []}
    for _ in range(repeats):
        rounds["compute_s"].append(_timed(compute_alone))
        rounds["transfer_s"].append(_timed(partial(rig.push, n, packed)))
        rounds["streamed_s"].append(_timed(partial(_streamed, rig, n, compute)))
    med = {k: statistics.median(v) for k, v in rounds.items()}
    hidden = (med["compute_s"] + med["transfer_s"] - med["streamed_s"]) / med["transfer_s"]
    return {**med, "compute_to_transfer": med["compute_s"] / med["transfer_s"],
            "hidden_fraction": min(1.0, max(0.0, hidden)), "hidden_fraction_unclamped": hidden,
            "rounds": rounds}


def measure_overlap(rig: LinkRig, size_mib: float, repeats: int) -> dict[str, Any]:
    """How much of the transfer hides behind a layer-by-layer prefill, computed two ways.

    Per-layer compute is calibrated so that compute (with packing) about equals the transfer.
    The main figure computes on the CPU (a matmul loop, torch on one thread), so it takes one
    of this machine's cores from the link, whose two ends both run in this process. The
    `accelerator_like` figure sleeps instead, as a host thread waits on a GPU: the link keeps
    every core.
    """
    n = blocks_for(size_mib)
    packed = rig.pack(n)
    rig.push(n, packed)
    transfer_s = statistics.median(_timed(partial(rig.push, n, packed)) for _ in range(3))
    pack_s = min(_timed(partial(rig.pack, n)) for _ in range(3))
    per_layer_s = max(transfer_s - pack_s, 0.0) / SPEC.num_layers
    matmul = LayerCompute(per_layer_s)
    return {
        "size_mib": size_mib, "blocks": n, "bytes": payload_nbytes(SPEC, n) * SPEC.num_layers,
        "layers": SPEC.num_layers, "compute_per_layer_target_s": per_layer_s,
        "matmul_iters_per_layer": matmul.iters,
        **_overlap_rounds(rig, n, packed, matmul, repeats),
        "accelerator_like": _overlap_rounds(rig, n, packed, partial(time.sleep, per_layer_s),
                                            repeats),
        "note": "hidden_fraction = (compute + transfer - streamed) / transfer, medians of "
                "interleaved rounds; compute includes packing each layer",
    }


# -- report ---------------------------------------------------------------------------------------


def run(*, sizes_mib: Sequence[float] = SIZES_MIB, repeats: int = REPEATS,
        overlap_mib: float = OVERLAP_MIB, progress: Console | None = None) -> dict[str, Any]:
    """Measure every system at every size, then the overlap; return the JSON report."""
    if not sizes_mib or min(sizes_mib) <= 0 or overlap_mib <= 0:
        raise ConfigError("payload sizes (--size, --overlap-mib) must be positive MiB")
    if repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {repeats}")
    say = progress.print if progress else log.info
    machine = machine_info(torch.get_num_threads(), ["grpcio", "ray", "numpy"])
    max_blocks = max(blocks_for(s) for s in (*sizes_mib, overlap_mib))
    say("starting Ray")
    # Ray first: it forks its daemons, which gRPC warns about once the link's threads run.
    with RayObjectStoreLink() as store:
        rig = LinkRig(max_blocks)
        try:
            with RawTCPLink(max_blocks * SPEC.bytes_per_block) as tcp:
                others = OtherCPUBusy()
                sizes = []
                for size in sizes_mib:
                    say(f"throughput at {size:g} MiB")
                    sizes.append(measure_size(rig, tcp, store, size, repeats))
                throughput_busy = others.share()
            store.close()  # Ray's processes stay out of the overlap run
            say(f"overlap at {overlap_mib:g} MiB")
            others = OtherCPUBusy()
            prev_threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                overlap = measure_overlap(rig, overlap_mib, repeats)
            finally:
                torch.set_num_threads(prev_threads)
            overlap["other_cpu_busy"] = others.share()
        finally:
            rig.close()
    largest = max(sizes, key=lambda s: s["bytes"])
    ratios = dict(largest["ratios"])
    for s in sizes:
        if s["size_mib"] == REPORTED_MIB:
            ratios[f"grpc_vs_raw_tcp_{REPORTED_MIB}mib"] = s["ratios"]["grpc_vs_raw_tcp"]
    return {
        "machine": machine,
        "spec": {"num_layers": SPEC.num_layers, "num_kv_heads": SPEC.num_kv_heads,
                 "head_dim": SPEC.head_dim, "block_size": SPEC.block_size, "dtype": "bfloat16",
                 "bytes_per_block": SPEC.bytes_per_block},
        "repeats": repeats,
        "sizes": sizes,
        "ratios": ratios,
        "ratio_basis": {"size_mib": largest["size_mib"], "statistic": "best-of-repeats MiB/s",
                        "grpc": "grpc_link: push_blocks + wait, pack and unpack included"},
        "overlap": overlap,
        "throughput_other_cpu_busy": throughput_busy,
        "notes": "all on loopback in one machine; grpc_link_prepacked excludes packing but not "
                 "the receiver's unpack; the Ray actor maps the object without a copy (one "
                 "node), and throughput_other_cpu_busy counts Ray's own processes",
    }


def print_report(report: dict[str, Any], console: Console) -> None:
    m = report["machine"]
    table = Table(title=f"baton bench kv: loopback, {m['cores']} cores, "
                        f"best of {report['repeats']}",
                  caption="MiB/s, best (median); ratios of best; sizes rounded to whole "
                          f"{SPEC.bytes_per_block >> 10} KiB blocks")
    table.add_column("MiB", justify="right")
    for col in ("grpc link", "grpc prepacked", "raw TCP", "Ray store", "link/TCP", "link/Ray"):
        table.add_column(col, justify="right")
    for s in report["sizes"]:
        cells = [f"{s['systems'][k]['best_mib_s']:.0f} ({s['systems'][k]['median_mib_s']:.0f})"
                 for k in ("grpc_link", "grpc_link_prepacked", "raw_tcp", "ray_object_store")]
        r = s["ratios"]
        table.add_row(f"{s['size_mib']:g}", *cells, f"{r['grpc_vs_raw_tcp']:.2f}",
                      f"{r['grpc_vs_ray_object_store']:.2f}")
    console.print(table)
    at = report["ratio_basis"]["size_mib"]
    for name, value in report["ratios"].items():
        where = "" if name.endswith("mib") else f" (at {at:g} MiB)"
        console.print(f"{name}{where}: {value:.2f}x")
    o = report["overlap"]
    console.print(f"overlap at {o['size_mib']:g} MiB: compute {o['compute_s'] * 1000:.0f} ms, "
                  f"transfer {o['transfer_s'] * 1000:.0f} ms, streamed "
                  f"{o['streamed_s'] * 1000:.0f} ms -> hidden_fraction {o['hidden_fraction']:.2f} "
                  f"(compute on this CPU); {o['accelerator_like']['hidden_fraction']:.2f} with "
                  "the compute off the CPU (accelerator-like)")
    warn_if_busy(console, {"throughput": report["throughput_other_cpu_busy"],
                           "overlap": o["other_cpu_busy"]},
                 "ratios hold up better than absolute figures; rerun on a quiet machine to be "
                 "sure")


def main(*, json_path: str | None = None, sizes_mib: Sequence[float] = SIZES_MIB,
         repeats: int = REPEATS, overlap_mib: float = OVERLAP_MIB) -> dict[str, Any]:
    """Run the benchmark, write the JSON report to `json_path` (if given), print a table."""
    return run_and_report(
        lambda progress: run(sizes_mib=sizes_mib, repeats=repeats, overlap_mib=overlap_mib,
                             progress=progress),
        print_report, json_path)
