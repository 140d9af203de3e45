"""Building an engine's speculator: which methods it offers, their proposers, and the layer-skip
depth, calibrated on load when not given."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from baton.actors.draft_model import decoder_layers, layerskip_draft, separate_draft
from baton.actors.medusa import MedusaHeads
from baton.actors.model_runner import BatchRow, load_model
from baton.actors.model_source import resolve
from baton.actors.sequence import Sequence
from baton.actors.speculator import SpecSettings, Speculator
from baton.errors import ConfigError
from baton.sampling import SamplingParams
from baton.speculation import BUILTIN_METHODS

if TYPE_CHECKING:
    from baton.actors.engine import Engine

log = logging.getLogger(__name__)

# Text the layer-skip depth is calibrated on: prose, a list, code, so no one genre decides it.
CALIBRATION_TEXT = """The river runs past the old mill, where the town keeps its records of every
flood since the bridge was built. Each spring the water rises, and each spring the clerks write down
how high it came, which streets it reached, and how long it stayed.
Steps to restart the service: 1. stop the worker. 2. clear the queue. 3. start the worker again.
def mean(values):
    total = 0
    for value in values:
        total += value
    return total / len(values)
"""


CALIBRATION_POSITIONS = 48


def offered_methods(engine: Engine) -> tuple[str, ...]:
    cfg = engine.config
    if cfg.methods is not None:
        return tuple(dict.fromkeys(["none", *cfg.methods]))
    methods = list(BUILTIN_METHODS)
    if cfg.draft_model:
        methods.append("draft")
    if cfg.medusa_heads:
        methods.append("medusa")
    return tuple(methods)


def build_speculator(engine: Engine) -> Speculator:
    cfg = engine.config
    methods = offered_methods(engine)
    settings = SpecSettings(methods=methods, max_speculative_tokens=cfg.max_speculative_tokens)
    proposers = {}
    if "layerskip" in methods:
        depth = len(decoder_layers(engine.model))
        layers = cfg.layerskip_layers or calibrate_layerskip(engine, depth)
        proposers["layerskip"] = layerskip_draft(engine.model, engine.cache, engine.device, layers)
        settings.draft_cost_ratio["layerskip"] = layers / depth
        log.info("layerskip drafts with %d of %d layers", layers, depth)
    if "draft" in methods:
        assert cfg.draft_model is not None
        model, tokenizer = load_model(resolve(cfg.draft_model), engine.dtype, engine.device)
        check_draft_tokenizer(engine, tokenizer)
        proposers["draft"] = separate_draft(model, engine.vocab_size, engine.cache.num_blocks,
                                            cfg.block_size, engine.dtype, engine.device)
        settings.draft_cost_ratio["draft"] = _num_params(model) / _num_params(engine.model)
    # The CPU's lean step: drafts stay within the rows whose projections all run on the skinny
    # kernels, where a verified token has the bits decoding it alone would give (32 rows in
    # bf16; past them oneDNN sums otherwise, and greedy near-ties flipped in bf16).
    step = engine.runner.decode_step
    speculator = Speculator(settings, engine.blocks, engine.cache, cfg.max_num_batched_tokens,
                            proposers, fast_tokens=step.exact_rows if step is not None else 0)
    if "medusa" in methods:
        assert cfg.medusa_heads is not None
        speculator.medusa = MedusaHeads.load(cfg.medusa_heads, engine.model)
    return speculator


def calibrate_layerskip(engine: Engine, depth: int, max_k: int = 8) -> int:
    """The depth L whose early exit promises the best speedup on `CALIBRATION_TEXT`.

    For each L: a, the share of positions where the first L layers (under the final norm and LM
    head) predict the full model's next token, and the speedup of the best k,
    (1 - a^(k+1)) / (1 - a) tokens per step for 1 + k * L / depth of the target's time.
    """
    ids = engine.tokenizer(CALIBRATION_TEXT)["input_ids"][: engine.max_model_len]
    ids = [i % engine.vocab_size for i in ids]
    seq = Sequence("layerskip-calibration", ids, SamplingParams(max_tokens=1))
    queries = engine.blocks.prefix_queries  # a scratch run is no prompt: keep the cache stats
    if depth < 2 or not engine.blocks.allocate_slots(seq, len(ids)):
        return max(depth // 2, 1)
    engine.blocks.prefix_queries = queries
    layers = decoder_layers(engine.model)
    hidden: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: hidden.append(
        out[0] if isinstance(out, tuple) else out)) for layer in layers]
    try:
        final = engine.runner.run_rows([BatchRow(ids, 0, len(ids), seq.block_table, len(ids))],
                                       through_modules=True)  # the hooks need the layers
    finally:
        for h in hooks:
            h.remove()
        engine.blocks.free(seq)
    # Scored on the text's last positions only: an LM-head projection per depth over every
    # position would cost more than the whole model pass (and every engine pays it on load).
    want = final.argmax(-1)[-CALIBRATION_POSITIONS:]
    norm = engine.model.get_decoder().norm
    # In float32: bf16 matmuls are slow on CPUs without bf16 units, and only the argmax counts.
    head = engine.model.get_output_embeddings().weight.detach().float()
    best, best_speedup = max(depth // 2, 1), 0.0
    with torch.inference_mode():
        for n in range(1, depth):
            early = norm(hidden[n - 1][0][-CALIBRATION_POSITIONS:]).float()
            guess = (early @ head.T).argmax(-1)
            a = min(float((guess == want).float().mean()), 0.98)
            log.debug("layerskip calibration: %d layers agree on %.2f", n, a)
            speedup = max((1 - a ** (k + 1)) / (1 - a) / (1 + k * n / depth)
                          for k in range(max_k + 1))
            if speedup > best_speedup:
                best, best_speedup = n, speedup
    log.info("layerskip calibration: %d layers, expected speedup %.2fx", best, best_speedup)
    return best


def _num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def check_draft_tokenizer(engine: Engine, draft_tokenizer) -> None:
    """A draft must tokenize text as the target does."""
    probe = "Speculative decoding, 12 tokens: x = f(y)\n"
    if draft_tokenizer(probe)["input_ids"] != engine.tokenizer(probe)["input_ids"]:
        raise ConfigError("the draft model's tokenizer differs from the target's; "
                          "choose a draft from the same model family")
