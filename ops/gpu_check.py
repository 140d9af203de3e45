"""The GPU checks as one script, for a machine with CUDA, torch, triton and transformers but not
Ray or Redis (what the test suite's conftest imports): `python -m baton.ops.gpu_check --out DIR`.

How it ran on an H200 whose image has torch 2.11, triton 3.6 and transformers 5.17: wheels for
pydantic, pydantic-core, annotated-types, typing-inspection, gguf (the default model) and
transformers 5.24 (the version the suite passes on) carried along, then
`pip install --no-index --no-deps --target /tmp/site WHEELS` and, from the checkout,
`pip install --no-index --no-deps --no-build-isolation --target /tmp/site .`; the script runs
with `PYTHONPATH=/tmp/site` from outside the checkout (whose `baton/` would shadow the
package), one process per section (`--sections graphs`, ...: they add to one report).

Sections (`--sections`, comma-separated; each one's figures are written as soon as it ends, and
one that fails does not stop the others):

1. `graphs`: tiny Llama and Qwen3 (float32) decode 12 requests with CUDA graphs and without;
   the tokens must be equal and equal transformers' greedy tokens, and the graphs must have
   replayed.
2. `spec`: every acceleration method on a tiny Llama (float32) through the CUDA verify path
   (Triton paged attention, tree masks for `lookahead` and `medusa`): greedy tokens equal to
   `none`'s, drafts made, no KV block leaked.
3. `bench_gpu`: `baton bench gpu` (decode at batch 1 and 32, with and without graphs, as a share
   of the copy bandwidth), and `torch.profiler`'s tables of 32 batch-1 decode steps.
4. `profile`: `baton profile` on this GPU over a GPU-sized grid, for a random-weight Llama of
   Llama-3.2-3B's shape; written as `profile_<gpu>.json` for `baton plan --profile`.
5. `moe`: `baton bench moe` on a random-weight Mixtral-shaped model in host memory (pinned),
   prefetched on a side stream; offloaded tokens must equal the resident model's.
6. `spec_bench`: `baton bench spec --batch1-only` on the default model (with `--gguf PATH`).

Writes `gpu_check.json` and each section's report into `--out`; exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

DEVICE = "cuda"
SECTIONS = ("graphs", "spec", "bench_gpu", "profile", "moe", "spec_bench")
# Llama-3.2-3B's shape (random weights): large enough that its matmuls and weight reads, not
# launches, set a step's time, and quick to build and load.
PROFILE_SHAPE = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                     num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                     vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                     tie_word_embeddings=True)
PROFILE_GRID = dict(prefill_lens=(256, 1024, 2048, 4096), batches=(1, 16, 64, 128),
                    contexts=(512, 2048))
# Mixtral's layout at a size whose experts (22 MB each in bf16, 128 of them) take real
# transfers: 25% resident is 2 of each layer's 8 experts.
MOE_SHAPE = dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=16,
                 num_attention_heads=16, num_key_value_heads=8, num_local_experts=8,
                 num_experts_per_tok=2, vocab_size=32000, max_position_embeddings=4096,
                 tie_word_embeddings=False)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts, half of them repetitive (drafts get accepted) and half random."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 2:
            out.append([rng.randrange(3, 250) for _ in range(rng.randrange(2, 40))])
        else:
            unit = [rng.randrange(3, 250) for _ in range(rng.randrange(3, 7))]
            out.append(unit * rng.randrange(3, 8))
    return out


def check_graphs(arch: str) -> dict[str, Any]:
    from transformers import GenerationConfig

    from baton.actors.engine import Engine
    from baton.actors.tiny import tiny_model
    from baton.sampling import SamplingParams

    prompts = _prompts(12)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    eager = Engine(f"tiny:{arch}", dtype="float32", device=DEVICE, cuda_graphs=False)
    graphed = Engine(f"tiny:{arch}", dtype="float32", device=DEVICE)
    want = [o.token_ids for o in eager.generate(prompts, params)]
    got = [o.token_ids for o in graphed.generate(prompts, params)]
    ref = tiny_model(arch).to(DEVICE)
    # No EOS stops it (as ignore_eos): an id the model never produces.
    cfg = GenerationConfig(max_new_tokens=16, do_sample=False, pad_token_id=0,
                           eos_token_id=ref.config.get_text_config().vocab_size + 1)
    hf = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device=DEVICE)
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
            hf.append(out[0, len(p):].tolist())
    graphs = graphed.runner.graphs
    return {"arch": arch, "graphs_equal_eager": got == want, "eager_equal_hf": want == hf,
            "graphs_enabled": bool(graphs is not None and graphs.enabled),
            "replays": graphs.replays if graphs is not None else 0,
            "ok": got == want == hf and graphs is not None and graphs.replays > 0}


def check_spec(scratch: Path) -> dict[str, Any]:
    """Every method's greedy tokens against `none`'s on CUDA, alone and mixed in one batch."""
    from baton.actors.engine import Engine
    from baton.actors.medusa import MedusaHeads
    from baton.sampling import SamplingParams

    methods = ["ngram", "lookahead", "layerskip", "draft", "medusa"]
    plain = Engine("tiny:llama", dtype="float32", device=DEVICE)
    MedusaHeads.for_model(plain.model, num_heads=3).save(scratch / "heads")
    engine = Engine("tiny:llama", dtype="float32", device=DEVICE, block_size=8,
                    methods=["none", *methods], draft_model="tiny:llama",
                    medusa_heads=str(scratch / "heads"))
    prompts = _prompts(12, seed=1)
    base = SamplingParams(max_tokens=40, ignore_eos=True)
    want = [o.token_ids for o in plain.generate(prompts, base)]
    rows: dict[str, Any] = {}
    for method in methods:
        params = SamplingParams(max_tokens=40, ignore_eos=True, method=method,
                                num_speculative_tokens=4)
        outs = engine.generate(prompts, params)
        rows[method] = {"equal_to_none": [o.token_ids for o in outs] == want,
                        "drafted": sum(o.metrics.spec_draft_tokens for o in outs),
                        "accepted": sum(o.metrics.spec_accepted_tokens for o in outs)}
    ids = [engine.add_request(p, SamplingParams(max_tokens=40, ignore_eos=True,
                                                method=methods[i % len(methods)]))
           for i, p in enumerate(prompts)]
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = list(o.token_ids)
    mixed = [done[i] for i in ids] == want
    graphs = engine.runner.graphs
    leaked = bool(engine.block_violations()) or \
        engine.blocks.num_free_blocks != engine.blocks.num_blocks
    ok = mixed and not leaked and all(r["equal_to_none"] and r["drafted"] > 0
                                      for r in rows.values())
    return {"methods": rows, "mixed_batch_equal_to_none": mixed, "blocks_leaked": leaked,
            "graph_steps": graphs.steps if graphs is not None else None,
            "graph_run_steps": graphs.run_steps if graphs is not None else None,
            "graph_replays": graphs.replays if graphs is not None else None, "ok": ok}


def run_bench_gpu(scratch: Path, out: Path) -> dict[str, Any]:
    from baton.ops.bench import gpu_decode

    model_dir = scratch / "llama-1b"
    ratios = gpu_decode.main(json_path=str(out / "bench_gpu.json"),
                             model_dir=str(model_dir))["ratios"]
    (out / "decode_trace.txt").write_text(trace_decode(str(model_dir)))
    return {"ratios": ratios, "ok": True}


def trace_decode(model: str, steps: int = 32) -> str:
    """torch.profiler's tables of `steps` batch-1 decode steps (graphs captured first): where a
    step's time goes besides the replay, on the host and on the device."""
    from baton.actors.engine import Engine
    from baton.sampling import SamplingParams

    engine = Engine(model=model, dtype="bfloat16", device=DEVICE)
    prompt = list(range(3, 19))
    engine.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))
    engine.add_request(prompt, SamplingParams(max_tokens=steps + 2, ignore_eos=True))
    engine.step()  # the prefill
    with _profiled() as prof:
        for _ in range(steps // 2):
            engine.step()
    # The host's Python, which torch.profiler does not see: cProfile over the other half.
    python = cProfile.Profile()
    python.enable()
    for _ in range(steps - steps // 2):
        engine.step()
    python.disable()
    while engine.has_unfinished():
        engine.step()
    text = io.StringIO()
    pstats.Stats(python, stream=text).sort_stats("cumulative").print_stats(40)
    return "\n\n".join([*_tables(prof, "cpu_time_total", "self_cpu_time_total"),
                        text.getvalue()])


def run_profile(scratch: Path, out: Path, gpu: str) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from baton.ops.bench.gpu_decode import random_model
    from baton.ops.profile_run import measure

    directory = random_model(scratch / "llama-3b-shape", lambda: LlamaForCausalLM(LlamaConfig(
        **PROFILE_SHAPE, bos_token_id=256, eos_token_id=256, pad_token_id=256)), DEVICE)
    prof = measure(model=str(directory), dtype="bfloat16", device=DEVICE, gpu=gpu,
                   kv_cache_memory=40 << 30, say=print, **PROFILE_GRID)  # type: ignore[arg-type]
    path = out / f"profile_{gpu.lower()}.json"
    prof.save(path)
    (out / "prefill_trace.txt").write_text(trace_prefill(str(directory), 1024))
    return {"path": path.name, "prefill": prof.prefill, "decode": prof.decode, "ok": True}


def trace_prefill(model: str, tokens: int) -> str:
    """torch.profiler's table of one `tokens`-token prefill step (after an untimed one): where
    a prefill's time goes."""
    from baton.actors.engine import Engine
    from baton.sampling import SamplingParams

    engine = Engine(model=model, dtype="bfloat16", device=DEVICE, max_num_batched_tokens=tokens,
                    enable_prefix_caching=False)
    rng = random.Random(1)
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    engine.generate([[rng.randrange(3, 250) for _ in range(tokens)]], one)
    with _profiled() as prof:
        engine.generate([[rng.randrange(3, 250) for _ in range(tokens)]], one)
    return "\n\n".join(_tables(prof, "cpu_time_total"))


def _profiled():
    """torch.profiler over the host, and over the GPU where there is one."""
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU]
                   + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else []))


def _tables(prof, *sort_keys: str) -> list[str]:
    """`prof`'s op tables sorted by each of `sort_keys`, then by device time (on a GPU)."""
    keys = [*sort_keys, "cuda_time_total" if DEVICE == "cuda" else "cpu_time_total"]
    return [prof.key_averages().table(sort_by=k, row_limit=30) for k in keys]


def run_moe(scratch: Path, out: Path) -> dict[str, Any]:
    from transformers import MixtralConfig, MixtralForCausalLM

    from baton.ops.bench import moe
    from baton.ops.bench.gpu_decode import random_model
    from baton.ops.bench.report import run_and_report

    directory = random_model(scratch / "mixtral-shape", lambda: MixtralForCausalLM(MixtralConfig(
        **MOE_SHAPE, bos_token_id=256, eos_token_id=256, pad_token_id=256)), DEVICE)
    report = run_and_report(
        lambda c: moe.run_moe_bench(str(directory), ["lru", "lfu", "lookahead", "trace"],
                                    [0.125, 0.25, 0.5], "host", 2, 24, 4, "bfloat16", DEVICE,
                                    None, None, c),
        moe.show, str(out / "bench_moe_gpu.json"))
    return {"ratios": report.get("ratios"), "ok": True}


def run_spec_bench(gguf: str, out: Path) -> dict[str, Any]:
    from baton.ops.bench import spec
    from baton.ops.bench.report import run_and_report

    report = run_and_report(
        lambda c: spec.run_spec_bench(None, ["ngram", "lookahead", "layerskip"], None, 4,
                                      "bfloat16", c, model=gguf, device=DEVICE,
                                      concurrent=False),
        spec.show, str(out / "bench_spec_gpu.json"))
    return {"ratios": report.get("ratios"), "ok": True}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="Directory for the JSON reports")
    parser.add_argument("--sections", default=",".join(SECTIONS[:5]),
                        help=f"Comma-separated, among {','.join(SECTIONS)}")
    parser.add_argument("--gpu", default="H200", help="Catalog name of this GPU")
    parser.add_argument("--gguf", default=None, help="The default model's GGUF (spec_bench)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("gpu_check needs CUDA; this machine has none", file=sys.stderr)
        return 1
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        print(f"unknown sections {unknown}; choose among {list(SECTIONS)}", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="baton-gpu-"))
    steps: dict[str, Callable[[], Any]] = {
        "graphs": lambda: [check_graphs(arch) for arch in ("llama", "qwen3")],
        "spec": lambda: check_spec(scratch),
        "bench_gpu": lambda: run_bench_gpu(scratch, out),
        "profile": lambda: run_profile(scratch, out, args.gpu),
        "moe": lambda: run_moe(scratch, out),
        "spec_bench": lambda: run_spec_bench(args.gguf, out),
    }
    path = out / "gpu_check.json"  # sections run one process each add to the same report
    report: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    report.update(device=torch.cuda.get_device_name())
    report.setdefault("sections", {})
    for name in sections:
        t0 = time.monotonic()
        try:
            result = steps[name]()
        except Exception:  # noqa: BLE001 - one failed section must not hide the others
            result = {"ok": False, "error": traceback.format_exc()}
        report["sections"][name] = {"seconds": round(time.monotonic() - t0, 1),
                                    "result": result}
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"== {name}: {time.monotonic() - t0:.0f}s", flush=True)
    print(json.dumps(report, indent=2, default=str))
    return 0 if all(_ok(report["sections"][s]["result"]) for s in sections) else 1


def _ok(result: Any) -> bool:
    if isinstance(result, list):
        return all(r.get("ok") for r in result)
    return bool(result.get("ok"))


if __name__ == "__main__":
    sys.exit(main())
