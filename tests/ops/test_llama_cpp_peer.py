"""The llama.cpp peer of `bench engine` (an optional extra): which file it runs, what it reports,
and how it times a request, against a stand-in for `llama_cpp` (the real one is not built by
`make test`)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

from baton.actors.model_source import ModelSource
from baton.ops.bench import llama_cpp_peer
from baton.ops.bench.workload import BenchRequest, Workload


class FakeLlama:
    """Yields token after token, past any EOS, as `Llama.generate` does; records its calls."""

    made: list[dict] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.prompts: list[list[int]] = []
        FakeLlama.made.append(self.__dict__)

    def generate(self, tokens, **sampling):
        assert sampling["temp"] == 0.0 and sampling["reset"]
        self.prompts.append(list(tokens))
        while True:
            yield 7


def test_it_runs_the_gguf_a_model_came_from():
    default = llama_cpp_peer.gguf_file(ModelSource("default", "default", None, "SmolLM2"))
    assert default is not None and default.suffix == ".gguf"
    assert llama_cpp_peer.quantization(default) == "Q4_1"
    assert llama_cpp_peer.gguf_file(ModelSource("m.gguf", "gguf", None, "m")) == Path("m.gguf")
    assert llama_cpp_peer.gguf_file(ModelSource("tiny:llama", "tiny", None, "tiny")) is None
    assert llama_cpp_peer.quantization(Path("model-F16.gguf")) == "F16"
    assert llama_cpp_peer.quantization(Path("weights.gguf")) == "unknown"


def test_each_request_decodes_its_max_tokens_greedy_on_the_same_threads(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", SimpleNamespace(Llama=FakeLlama))
    FakeLlama.made.clear()
    wl = Workload([BenchRequest(list(range(5, 30)), 12), BenchRequest([3, 1, 4], 1)], seed=0)
    result = llama_cpp_peer.run_llama_cpp(Path("SmolLM2.Q4_1.gguf"), 2, wl, 4096)
    llm = FakeLlama.made[0]
    assert llm["kwargs"]["n_threads"] == llm["kwargs"]["n_threads_batch"] == 2
    assert llm["kwargs"]["n_ctx"] == 4096
    # A warm-up outside the workload, then the workload's prompts in order.
    assert llm["prompts"][1:] == [list(range(5, 30)), [3, 1, 4]]
    assert llm["prompts"][0] not in llm["prompts"][1:]
    assert [t.tokens for t in result.timings] == [12, 1]
    assert result.timings[0].tpot is not None and result.timings[1].tpot is None
    assert result.notes == {"concurrency": 1, "gguf": "SmolLM2.Q4_1.gguf",
                            "quantization": "Q4_1"}
    summary = result.summary()
    assert summary["output_tokens"] == 13 and summary["num_requests"] == 2
