"""The engine: requests in, tokens out, one `step()` at a time (continuous batching)."""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Callable, Iterator

import torch

from baton.actors import dtype_choice
from baton.actors.block_manager import BlockManager
from baton.actors.cuda_graphs import DecodeGraphs
from baton.actors.detokenizer import IncrementalDetokenizer
from baton.actors.kv_cache import KVCacheSpec, PagedKVCache
from baton.actors.model_runner import ModelRunner, load_model
from baton.actors.model_source import resolve
from baton.actors.moe_offload import MoEOffload, enable_offload
from baton.actors.sampler import sample, token_logprobs
from baton.actors.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from baton.actors.sequence import Sequence
from baton.actors.spec_setup import build_speculator
from baton.engine_config import DTYPE_NAMES, EngineConfig  # EngineConfig: also imported from here
from baton.errors import (
    ConfigError,
    ContextLengthError,
    InvalidRequestError,
    RequestNotFoundError,
)
from baton.outputs import ExpertCacheUse, RequestOutput, StepStats, TokenLogprob
from baton.prompts import chat_prompt, check_context, encode_prompt
from baton.sampling import SamplingParams

log = logging.getLogger(__name__)

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def _check_device(config: EngineConfig) -> None:
    """The one engine option only the machine that runs the engine can check."""
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {config.device!r} asked for, but CUDA is not available here")


class Engine:
    """Runs one model on one device with a paged KV cache.

    Single-threaded: `add_request`, `abort` and `step` are called from one thread (a worker actor
    wraps it). `step()` returns news for every request that produced text or finished.
    """

    def __init__(self, model: str | None = None, config: EngineConfig | None = None, **overrides):
        if config is None:
            config = EngineConfig.from_options(**({"model": model} if model else {}), **overrides)
        _check_device(config)
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = torch.device(config.device)
        self.dtype = dtype_choice.resolve(config.dtype, self.device, config.num_threads)
        self.source = resolve(config.model)
        t0 = time.monotonic()
        self.moe: MoEOffload | None = None
        self.model, self.tokenizer = load_model(self.source, self.dtype, self.device,
                                                config.quantization, config.quant_group_size,
                                                self._offload_experts)
        log.info("loaded %s in %.1fs", self.source.name, time.monotonic() - t0)

        text_config = self.model.config.get_text_config()
        self.vocab_size = text_config.vocab_size
        limit = getattr(text_config, "max_position_embeddings", None) or 4096
        self.max_model_len = min(config.max_model_len or limit, limit)
        spec = KVCacheSpec.from_model_config(self.model.config, config.block_size, self.dtype)
        num_blocks = config.num_kv_blocks or min(
            spec.num_blocks_for(config.kv_cache_memory),
            -(-self.max_model_len // config.block_size) * config.max_num_seqs,
        )
        graphs = config.cuda_graphs and self.device.type == "cuda"
        self.cache = PagedKVCache(spec, num_blocks, self.device, scratch_block=graphs)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                            config.long_prefill_token_threshold),
            self.blocks,
        )
        self.runner = ModelRunner(self.model, self.cache, self.device)
        if graphs:
            self.runner.graphs = DecodeGraphs.build(
                self.model, self.cache, config.max_num_seqs,
                -(-self.max_model_len // config.block_size))
        self.speculator = build_speculator(self)
        self.eos_ids = self._eos_ids()
        self._seqs: dict[str, Sequence] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._generators: dict[str, torch.Generator] = {}
        self._pending: list[RequestOutput] = []
        self.last_step: StepStats | None = None  # the latest step that ran the model
        self._ids = itertools.count()

    # -- requests ---------------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a request; raises a `baton.errors` type if it can never run, touching nothing."""
        seq = self._new_sequence(prompt, params, request_id)
        self.scheduler.add(seq)
        return seq.request_id

    def _new_sequence(
        self, prompt: str | list[int], params: SamplingParams | None, request_id: str | None
    ) -> Sequence:
        """Validate a request and register its per-request state (not yet scheduled)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be a baton.SamplingParams")
        prompt_ids = self.encode(prompt)
        check_context(len(prompt_ids), params.max_tokens, self.max_model_len)
        total = len(prompt_ids) + params.max_tokens
        if self.blocks.blocks_needed(total) > self.blocks.num_blocks:
            raise ContextLengthError(
                f"prompt plus max_tokens ({total} tokens) exceeds the whole KV cache "
                f"({self.blocks.num_blocks * self.blocks.block_size} tokens); lower max_tokens "
                "or give the engine more KV memory"
            )
        request_id = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        if request_id in self._seqs:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        method = self.speculator.method_of(params.method)
        seq = Sequence(request_id, prompt_ids, params)
        seq.metrics.method = method
        self.speculator.start(seq)
        self._seqs[request_id] = seq
        self._detok[request_id] = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.stop)
        if params.seed is not None:
            self._generators[request_id] = torch.Generator(device=self.device).manual_seed(
                params.seed
            )
        return seq

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt (text or ids), validated; raises `InvalidRequestError`."""
        return encode_prompt(self.tokenizer, self.vocab_size, prompt)

    def abort(self, request_id: str) -> None:
        """Stop a request now; its final output (finish_reason 'abort') comes with the next step."""
        seq = self._seqs.get(request_id)
        if seq is None:
            raise RequestNotFoundError(f"no running request {request_id!r}")
        self.scheduler.finish(seq, "abort")
        self._pending.append(self._finish_output(seq))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    def take_pending(self) -> list[RequestOutput]:
        """Outputs decided between steps (an abort's final output, an imported prompt's first
        token), now rather than after the next forward pass; `step` returns them otherwise."""
        outputs, self._pending = self._pending, []
        return outputs

    # -- the loop ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample, and report what changed."""
        outputs = self._step()
        if self.moe is not None:  # a request's expert trace is complete once it ends
            for out in outputs:
                if out.finished:
                    self.moe.policy.end_request(out.request_id)
        return outputs

    def _step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        expert_before = self.moe.use() if self.moe is not None else None
        self.speculator.propose(self.scheduler.running, self._waiting_tokens(), self._generators)
        sched = self.scheduler.schedule()
        for seq in self.scheduler.running:
            if seq.draft is not None and seq.request_id not in sched.num_scheduled_tokens:
                seq.drop_draft()
        if not sched:
            return outputs
        if self.moe is not None:
            self.moe.policy.begin_step([(s.request_id, sched.num_scheduled_tokens[s.request_id])
                                        for s in sched.seqs])
        try:
            t0 = time.perf_counter()
            logits = self.runner.run(sched, self._layer_hook(sched),
                                     self.speculator.wants_hidden(sched.seqs))
            seconds = time.perf_counter() - t0
            if all(sched.num_scheduled_tokens[s.request_id] == 1 + s.num_draft_tokens
                   for s in sched.seqs):
                # Only decode and verify steps: what drafting adds to. Prompt chunks run many
                # tokens per row far more cheaply, and would make a draft token look free.
                self.speculator.observe_step(sched.total_tokens, seconds)
        except Exception as exc:  # one bad batch must not take the engine down
            log.exception("model step failed; failing its %d requests", len(sched.seqs))
            self._forward_done(sched)
            return outputs + self._fail_step(sched, exc)
        self._forward_done(sched)
        self._record_step(sched, seconds, expert_before)
        self.scheduler.update(sched)
        try:
            outputs.extend(self._postprocess(sched, logits))
        except Exception as exc:  # a request's tokens could not be chosen: the engine goes on
            log.exception("sampling a step failed; failing its %d requests", len(sched.seqs))
            outputs.extend(self._fail_step(sched, exc))
        return outputs

    def _fail_step(self, sched: SchedulerOutput, exc: Exception) -> list[RequestOutput]:
        """End the step's unfinished requests with `exc` as their error (blocks freed)."""
        outputs = []
        for seq in list(sched.seqs):
            if seq.is_finished:
                continue
            seq.drop_draft()
            seq.error = f"{type(exc).__name__}: {exc}"
            self.scheduler.finish(seq, "error")
            outputs.append(self._finish_output(seq))
        return outputs

    def _record_step(self, sched: SchedulerOutput, seconds: float,
                     expert_before: ExpertCacheUse | None) -> None:
        """Keep the step's stats and charge its expert-cache use to each request it ran."""
        used = (self.moe.use() - expert_before
                if self.moe is not None and expert_before is not None else None)
        self.last_step = StepStats(len(sched.seqs), sched.total_tokens, seconds, used)
        if used is not None:
            for seq in sched.seqs:
                m = seq.metrics
                m.expert_cache = used if m.expert_cache is None else m.expert_cache + used
            log.debug("step: %d seqs, %d tokens, %.4fs; experts %d hit, %d missed, %d bytes "
                      "loaded, %.4fs stalled", len(sched.seqs), sched.total_tokens, seconds,
                      used.hits, used.misses, used.bytes_loaded, used.stall_seconds)

    def _offload_experts(self, model) -> None:
        """With `moe_offload`, move the model's experts to their store while it is on the host."""
        if self.config.moe_offload is not None:
            self.moe = enable_offload(model, self.config.moe_offload, self.device,
                                      self.source.name)

    def _layer_hook(self, sched: SchedulerOutput) -> Callable[[int], None] | None:
        """Called by each layer once it has written this step's KV (None: no one listens)."""
        return None

    def _forward_done(self, sched: SchedulerOutput) -> None:
        """The step's forward pass ended (or failed)."""

    def _waiting_tokens(self) -> int:
        """Prompt tokens queued for the next step (what drafting competes with)."""
        return sum(len(s) - s.num_computed_tokens for s in self.scheduler.waiting)

    def _postprocess(self, sched: SchedulerOutput, logits: torch.Tensor) -> list[RequestOutput]:
        done = [s for s in sched.seqs if s.num_computed_tokens == len(s)]
        if not done:
            return []
        now = time.monotonic()
        outputs = []
        plain, plain_rows, row = [], [], 0
        hidden_rows: list[int] = []  # per `done` request: the row whose hidden state made its token
        hidden = self.runner.last_hidden
        for seq in done:
            n = 1 + seq.num_draft_tokens
            if seq.draft is None:
                plain.append(seq)
                plain_rows.append(row)
                hidden_rows.append(row)
            else:
                out, last_row = self._settle_draft(seq, logits[row : row + n], now)
                outputs.append(out)
                hidden_rows.append(row + last_row)
            row += n
        if plain:
            gens = [self._generators.get(s.request_id) for s in plain]
            rows = logits[plain_rows] if len(plain_rows) != logits.shape[0] else logits
            tokens, logprobs = sample(rows, [s.params for s in plain], gens)
            for seq, token, lp in zip(plain, tokens, logprobs, strict=True):
                outputs.append(self._emit(seq, [token], [lp], now))
        if hidden is not None:
            # After emitting: finished requests draft nothing, the rest share one heads pass.
            self.speculator.observe_hidden(done, hidden[hidden_rows])
        return outputs

    def _settle_draft(self, seq: Sequence, logits: torch.Tensor,
                      now: float) -> tuple[RequestOutput, int]:
        """Verify a request's draft and emit what it accepted plus the target's own token; also
        the logits row the last token came from."""
        verdict = self.speculator.settle(seq, logits, self._generators.get(seq.request_id))
        lps = token_logprobs(logits[verdict.rows], verdict.tokens,
                             [seq.params.logprobs] * len(verdict.tokens))
        out = self._emit(seq, verdict.tokens, lps, now)
        self.speculator.after_emit(seq)
        return out, verdict.rows[-1]

    def _emit(self, seq: Sequence, tokens: list[int], lps: list[TokenLogprob | None],
              now: float) -> RequestOutput:
        """Append tokens to `seq` until one finishes it, and report them as one output."""
        if seq.metrics.first_token is None:
            seq.metrics.first_token = now
        seq.metrics.num_forward_passes += 1
        detok = self._detok[seq.request_id]
        for i, (token, lp) in enumerate(zip(tokens, lps, strict=True)):
            seq.token_ids.append(token)
            if seq.logprobs is not None and lp is not None:
                seq.logprobs.append(lp)
            reason = self._finish_reason(seq, token, detok.add(token))
            if reason:
                self.speculator.emitted(seq, tokens[: i + 1])
                self.scheduler.finish(seq, reason)
                return self._finish_output(seq, tokens[: i + 1])
        self.speculator.emitted(seq, tokens)
        return self._output(seq, tokens, detok.delta(False))

    def _finish_reason(self, seq: Sequence, token: int, stopped: bool) -> str | None:
        p = seq.params
        if stopped or token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            return "stop"
        if seq.num_output_tokens >= p.max_tokens:
            return "length"
        return None

    def _output(self, seq: Sequence, delta_ids: list[int], delta_text: str) -> RequestOutput:
        detok = self._detok[seq.request_id]
        return RequestOutput(
            request_id=seq.request_id,
            delta_text=delta_text,
            delta_token_ids=delta_ids,
            text=detok.text[: detok.emitted],
            token_ids=seq.output_token_ids,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            metrics=seq.metrics,
            logprobs=seq.logprobs,
            error=seq.error,
        )

    def _finish_output(self, seq: Sequence, delta_ids: list[int] | None = None) -> RequestOutput:
        detok = self._detok[seq.request_id]
        detok.flush()
        out = self._output(seq, delta_ids or [], detok.delta(True))
        self._forget_request(seq.request_id)
        return out

    def _forget_request(self, request_id: str) -> None:
        """Drop a request's per-request state (sequence, detokenizer, seeded generator) without
        an output; its KV blocks and its place in the scheduler are the caller's to release."""
        self._seqs.pop(request_id, None)
        self._detok.pop(request_id, None)
        self._generators.pop(request_id, None)
        self.speculator.finish(request_id)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (self.model.generation_config, self.model.config):
            eos = getattr(src, "eos_token_id", None)
            if eos is not None:
                ids.update(eos if isinstance(eos, list) else [eos])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    # -- conveniences -----------------------------------------------------------------------------

    def generate(
        self, prompts: list[str | list[int]], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """Run `prompts` to completion together; final outputs in the same order."""
        ids = [self.add_request(p, params) for p in prompts]
        final: dict[str, RequestOutput] = {}
        wanted = set(ids)
        while wanted - final.keys():
            for out in self.step():
                if out.finished and out.request_id in wanted:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    def stream(
        self, prompt: str | list[int], params: SamplingParams | None = None
    ) -> Iterator[RequestOutput]:
        """Yield one request's outputs as they come (other queued requests advance too)."""
        rid = self.add_request(prompt, params)
        try:
            while True:
                for out in self.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            if rid in self._seqs:
                self.abort(rid)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        return chat_prompt(self.tokenizer, self.source.name, messages)

    # -- introspection ----------------------------------------------------------------------------

    def _live(self) -> list[Sequence]:
        """Every unfinished sequence that may hold KV blocks."""
        return self.scheduler.live()

    def block_violations(self) -> list[str]:
        """Broken 'every block is free or owned' facts; empty when the cache is consistent."""
        return self.blocks.violations(self._live())

    def expert_cache_stats(self) -> dict[str, float | int | str] | None:
        """The MoE expert cache's counters (hits, misses, bytes loaded, stall seconds, prefetch
        precision and recall); None without `moe_offload`."""
        return self.moe.stats() if self.moe is not None else None

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)
