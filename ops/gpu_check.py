"""The GPU checks as one script, for a machine with CUDA, torch, triton and transformers but not
Ray or Redis (what the test suite's conftest imports): `python -m baton.ops.gpu_check --out DIR`.

Baton installs there without its dependencies (`pip install --no-deps -e .`); the few the engine
and the benchmark import beyond that image (pydantic with pydantic-core, annotated-types and
typing-inspection; rich with markdown-it-py, mdurl and pygments) go along as wheels
(`pip download --no-deps --dest .gpu-wheels ...` here, `pip install --no-index --find-links
.gpu-wheels ...` there).

1. CUDA graphs: tiny Llama and Qwen3 (float32) decode 12 requests with graphs and without; the
   tokens must be equal and equal transformers' greedy tokens, and the graphs must have
   replayed.
2. `baton bench gpu` (`ops/bench/gpu_decode.py`): decode at batch 1 and 32, with and without
   graphs, as a share of the copy bandwidth.

Writes `gpu_check.json` (and `bench_gpu.json`) into `--out`; exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import traceback
from pathlib import Path
from typing import Any

import torch


def check_graphs(arch: str) -> dict[str, Any]:
    from transformers import GenerationConfig

    from baton.actors.engine import Engine
    from baton.actors.tiny import tiny_model
    from baton.sampling import SamplingParams

    rng = random.Random(0)
    prompts = [[rng.randrange(3, 250) for _ in range(rng.randrange(2, 40))] for _ in range(12)]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    eager = Engine(f"tiny:{arch}", dtype="float32", device="cuda", cuda_graphs=False)
    graphed = Engine(f"tiny:{arch}", dtype="float32", device="cuda")
    want = [o.token_ids for o in eager.generate(prompts, params)]
    got = [o.token_ids for o in graphed.generate(prompts, params)]
    ref = tiny_model(arch).to("cuda")
    # No EOS stops it (as ignore_eos): an id the model never produces.
    cfg = GenerationConfig(max_new_tokens=16, do_sample=False, pad_token_id=0,
                           eos_token_id=ref.config.get_text_config().vocab_size + 1)
    hf = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
            hf.append(out[0, len(p):].tolist())
    graphs = graphed.runner.graphs
    return {"arch": arch, "graphs_equal_eager": got == want, "eager_equal_hf": want == hf,
            "graphs_enabled": bool(graphs is not None and graphs.enabled),
            "replays": graphs.replays if graphs is not None else 0,
            "ok": got == want == hf and graphs is not None and graphs.replays > 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="Directory for the JSON reports")
    parser.add_argument("--skip-bench", action="store_true", help="Only the correctness checks")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("gpu_check needs CUDA; this machine has none", file=sys.stderr)
        return 1
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "checks": []}
    for arch in ("llama", "qwen3"):
        try:
            report["checks"].append(check_graphs(arch))
        except Exception:  # noqa: BLE001 - one failed check must not hide the others
            report["checks"].append({"arch": arch, "ok": False, "error": traceback.format_exc()})
    if not args.skip_bench:
        from baton.ops.bench import gpu_decode

        try:
            report["bench"] = gpu_decode.main(json_path=str(out / "bench_gpu.json"))["ratios"]
        except Exception:  # noqa: BLE001
            report["bench"] = {"error": traceback.format_exc()}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if all(c["ok"] for c in report["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
