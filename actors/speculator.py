"""Speculative decoding inside the continuous batch: per request, a method drafts tokens before
the step, the step verifies them with every other request's tokens, and the verdict settles what
the request emits and what KV stays.

Methods: `ngram` (prompt lookup), `lookahead` (n-gram trie, tree drafts), `draft` (a small model),
`layerskip` (the target's first layers), `medusa` (trained heads, tree drafts). A request with
method `none` (or a step where drafting does not pay, see `spec_budget`) decodes one token.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from baton.actors.block_manager import BlockManager
from baton.actors.draft_model import DraftModelProposer, DraftRequest
from baton.actors.draft_tree import DraftTree
from baton.actors.kv_cache import PagedKVCache
from baton.actors.lookahead import LookaheadProposer
from baton.actors.medusa import MedusaHeads
from baton.actors.medusa_trees import draft_trees
from baton.actors.ngram import propose_ngram
from baton.actors.sequence import Sequence
from baton.actors.spec_budget import (
    AcceptanceTracker,
    Candidate,
    HeadsBackoff,
    StepCostModel,
    choose_k,
)
from baton.actors.spec_verify import Verdict, verify
from baton.errors import InvalidRequestError
from baton.speculation import AUTO, NONE

log = logging.getLogger(__name__)

MEDUSA_TOP_K = 4  # candidates per head in a Medusa tree
CALIBRATION_DECAY = 0.85  # how fast a request's heads calibration forgets older drafts
# Pseudo-tokens of "the heads are right" the calibration starts from and always keeps: a few bad
# trees must not scale a request's gains so low that it never drafts (and never re-learns) again.
CALIBRATION_PRIOR = 4.0
# Per step a Medusa request goes without heads, the heads' measured cost drifts down by this
# factor, toward trying them again (they are timed anew when they run).
HEADS_COST_RELAX = 0.9
# Acceptance assumed before a request has drafted anything.
PRIOR_ACCEPTANCE = {"ngram": 0.4, "lookahead": 0.4, "draft": 0.6, "layerskip": 0.5,
                    "medusa": 0.5}


@dataclass(slots=True)
class SpecSettings:
    """What a pool's engine offers: methods, the longest draft, prompt-lookup n-gram range."""

    methods: tuple[str, ...] = ("none", "ngram", "layerskip")
    max_speculative_tokens: int = 8
    ngram_min: int = 1
    ngram_max: int = 4
    draft_cost_ratio: dict[str, float] = field(default_factory=dict)  # draft pass / target pass


class Speculator:
    """Drafts before a step and settles verdicts after it; owned by one engine."""

    def __init__(self, settings: SpecSettings, blocks: BlockManager,
                 cache: PagedKVCache, budget_tokens: int,
                 proposers: dict[str, DraftModelProposer] | None = None, fast_tokens: int = 0):
        self.settings = settings
        self.blocks = blocks
        self.cache = cache
        self.budget_tokens = budget_tokens
        # The longest step the runner takes on its fast path, each row with the bits it would
        # have alone (0: no such limit); see `propose`.
        self.fast_tokens = fast_tokens
        self.proposers = proposers or {}
        self.cost = StepCostModel()
        self.lookahead = LookaheadProposer() if "lookahead" in settings.methods else None
        self.medusa: MedusaHeads | None = None  # set when the pool offers `medusa`
        self._hidden: dict[str, torch.Tensor] = {}  # request -> [H] its heads draft from next
        # Medusa: request -> [accepted, expected] (decayed sums), how far its heads' path
        # probabilities are to be trusted, and what its draft in flight expects.
        self._calibration: dict[str, list[float]] = {}
        self._expected: dict[str, float] = {}
        self._heads_s = 0.0  # seconds the heads and their trees take per request (moving mean)
        self._heads_pass_s = 0.0  # the latest heads pass, whole
        self._heads_backoff = HeadsBackoff()
        self._trackers: dict[str, AcceptanceTracker] = {}

    # -- requests ---------------------------------------------------------------------------------

    def method_of(self, method: str) -> str:
        """The method a request runs with; raises `InvalidRequestError` when not offered."""
        if method == AUTO:
            return NONE
        if method not in self.settings.methods:
            raise InvalidRequestError(
                f"method {method!r} is not offered by this pool; offered: "
                f"{list(self.settings.methods)} (or 'auto')"
            )
        return method

    def start(self, seq: Sequence) -> None:
        if seq.metrics.method == "lookahead" and self.lookahead is not None:
            self.lookahead.start(seq.request_id, seq.prompt_token_ids)

    def emitted(self, seq: Sequence, tokens: list[int]) -> None:
        """`tokens` were appended to `seq` (verified, or sampled plainly)."""
        if self.lookahead is not None and seq.request_id in self.lookahead:
            self.lookahead.extend(seq.request_id, tokens)

    def wants_hidden(self, seqs: list[Sequence]) -> bool:
        """Whether this step must keep final hidden states (Medusa heads draft from them)."""
        return self.medusa is not None and any(s.metrics.method == "medusa" for s in seqs)

    def observe_hidden(self, seqs: list[Sequence], hidden: torch.Tensor) -> None:
        """`hidden [N, H]`: row i produced the last token of `seqs[i]`; an unfinished Medusa
        request's heads draft its next step from it."""
        if self.medusa is None:
            return
        for i, seq in enumerate(seqs):
            if seq.metrics.method == "medusa" and not seq.is_finished:
                self._hidden[seq.request_id] = hidden[i]

    def finish(self, request_id: str) -> None:
        self._trackers.pop(request_id, None)
        self._hidden.pop(request_id, None)
        self._calibration.pop(request_id, None)
        self._expected.pop(request_id, None)
        if self.lookahead is not None:
            self.lookahead.finish(request_id)

    # -- before the step --------------------------------------------------------------------------

    def propose(self, running: list[Sequence], waiting_tokens: int,
                generators: dict[str, torch.Generator]) -> None:
        """Attach drafts to decoding requests, as long as the step's expected speed gains."""
        for seq in running:
            seq.drop_draft()  # a draft left unscheduled by the last step is stale
        decoding = [s for s in running if s.num_uncomputed_tokens == 1 and s.num_output_tokens]
        spec = [s for s in decoding if s.metrics.method != NONE]
        if not spec:
            return
        base = len(decoding) + sum(s.num_uncomputed_tokens for s in running
                                   if s not in decoding) + waiting_tokens
        base = min(base, self.budget_tokens)
        budget = self.budget_tokens
        if self.fast_tokens > 0 and base <= self.fast_tokens:
            # Drafts do not push a step off the fast path: past it a step costs a step more
            # than the cost model's straight line says, and on a CPU in bf16 its rows are no
            # longer summed as decoding sums them (`CpuDecodeStep.exact_rows`).
            budget = min(budget, self.fast_tokens)
        a, b = self.cost.coefficients()
        # Heads run only for Medusa requests whose recent acceptance pays for one draft token
        # and their share of the heads' pass in this step (a large batch turns them off):
        # `choose_k`'s test for one token, (base + rate) / (step + b + heads) > base / step.
        step_s = a + b * base
        medusa = [s for s in spec if s.metrics.method == "medusa"]
        heads_for = [s for s in medusa if s.params.num_speculative_tokens
                     or self._tracker(s).rate * step_s > base * (b + self._heads_s)]
        if len(heads_for) < len(medusa):
            # The heads' cost is measured only when they run: without this, one slow pass (a
            # stall on a busy machine) could keep them off for good.
            self._heads_s *= HEADS_COST_RELAX
        heads_for = self._heads_backoff.admit(heads_for, len(decoding))
        trees = self._medusa_trees(heads_for)
        cands, fixed = [], []
        for seq in spec:
            method = seq.metrics.method
            left = max(seq.params.max_tokens - seq.num_output_tokens - 1, 0)  # +1 from the step
            if seq.params.num_speculative_tokens:  # the request fixed k: no adapting
                fixed.append(min(seq.params.num_speculative_tokens, left))
                cands.append(Candidate(0.0, 0))
                continue
            ratio = self.settings.draft_cost_ratio.get(method, 0.0)
            cap = min(self.settings.max_speculative_tokens, left)
            fixed.append(0)
            cand = Candidate(self._tracker(seq).rate, cap, ratio * a)
            if method == "medusa":  # the tree's own path probabilities, calibrated
                _, scores = trees.get(seq.request_id, (None, []))
                trust = self._trust(seq.request_id)
                cand.gains = [min(trust * p, 0.98) for p in scores]
            cands.append(cand)
        room = budget - sum(fixed)
        ks = [f + k for f, k in zip(fixed, choose_k(cands, base, room, self.cost), strict=True)]
        by_model: dict[str, list[DraftRequest]] = {}
        for seq, k in zip(spec, ks, strict=True):
            if k < 1 or not self._reserve(seq, k, len(running)):
                continue
            method = seq.metrics.method
            if method == "ngram":
                draft = propose_ngram(seq.token_ids, k, self.settings.ngram_min,
                                      self.settings.ngram_max)
                if draft is not None:
                    seq.attach_draft(draft)
            elif method == "lookahead" and self.lookahead is not None:
                draft = self.lookahead.propose(seq.request_id, seq.token_ids, k)
                if draft is not None and len(draft):
                    seq.attach_draft(draft)
            elif method == "medusa" and seq.request_id in trees:
                tree, scores = trees[seq.request_id]
                if len(tree):
                    seq.attach_draft(tree.prefix(k))
                    self._expected[seq.request_id] = sum(scores[:k])
            elif method in self.proposers:
                req = DraftRequest(seq, k, generators.get(seq.request_id))
                by_model.setdefault(method, []).append(req)
        for method, reqs in by_model.items():
            self.proposers[method].propose(reqs)
        if trees:
            # The pass paid if the tokens its drafts are expected to add cover its time, as a
            # share of the step's tokens and time.
            gained = sum(self._trust(s.request_id) * self._expected.get(s.request_id, 0.0)
                         for s in heads_for if s.draft is not None)
            self._heads_backoff.passed(gained / base >= self._heads_pass_s / step_s,
                                       len(decoding))
        for seq in spec:
            if seq.draft is None and not seq.params.num_speculative_tokens:
                self._relax(seq)

    def _medusa_trees(self, seqs: list[Sequence]) -> dict[str, tuple[DraftTree, list[float]]]:
        """Per Medusa request with a hidden state to draft from: its candidate tree as large as
        it may grow, and the nodes' scores (one heads pass for all of them)."""
        ready = [s for s in seqs if s.request_id in self._hidden]
        if self.medusa is None or not ready:
            return {}
        t0 = time.perf_counter()
        with torch.inference_mode():
            hidden = torch.stack([self._hidden.pop(s.request_id) for s in ready])
            roots = [s.token_ids[-1] for s in ready]  # sampled from `hidden`, not yet computed
            # A node pays for its token only if its gain beats the step's marginal cost per
            # token against a one-token step, b / (a + b), at the least (a larger batch asks more).
            a, b = self.cost.coefficients()
            floor = b / max(a + b, 1e-12)
            drafted = draft_trees(self.medusa, hidden, roots, self.settings.max_speculative_tokens,
                                  MEDUSA_TOP_K, [floor / self._trust(s.request_id) for s in ready])
        trees = {s.request_id: scored for s, scored in zip(ready, drafted, strict=True)}
        self._heads_pass_s = time.perf_counter() - t0
        took = self._heads_pass_s / len(ready)
        self._heads_s = took if not self._heads_s else 0.8 * self._heads_s + 0.2 * took
        return trees

    def _trust(self, request_id: str) -> float:
        """Accepted tokens per token the heads expected, over the request's recent drafts and
        CALIBRATION_PRIOR tokens of trust (1 before it has any): scales its path probabilities
        into gains."""
        accepted, expected = self._calibration.get(request_id, (0.0, 0.0))
        return min((accepted + CALIBRATION_PRIOR) / (expected + CALIBRATION_PRIOR), 2.0)

    def _relax(self, seq: Sequence) -> None:
        """No draft this step: the request's estimates drift back toward trying again."""
        self._tracker(seq).relax()
        calib = self._calibration.get(seq.request_id)
        if calib is not None:  # toward no evidence: trust 1
            calib[0] *= CALIBRATION_DECAY
            calib[1] *= CALIBRATION_DECAY

    def _reserve(self, seq: Sequence, k: int, num_running: int) -> bool:
        """Blocks for the draft's KV, keeping one free block per running request in reserve."""
        need = self.blocks.blocks_needed(len(seq) + k) - len(seq.block_table)
        if need > 0 and self.blocks.num_free_blocks - need < num_running:
            return False
        return self.blocks.allocate_slots(seq, 1 + k)

    # -- after the step ---------------------------------------------------------------------------

    def observe_step(self, tokens: int, seconds: float) -> None:
        self.cost.observe(tokens, seconds)

    def settle(self, seq: Sequence, logits: torch.Tensor,
               generator: torch.Generator | None) -> Verdict:
        """Verify `seq`'s draft against `logits [len(draft) + 1, V]`; remove the draft and move
        the accepted nodes' KV into place. The caller appends `verdict.tokens`."""
        draft = seq.draft
        assert draft is not None
        verdict = verify(draft, logits, seq.params, generator)
        root = len(seq) - len(draft) - 1
        if not draft.is_chain and verdict.path:
            self._compact(seq, root, verdict.path)
        draft_kv = seq.draft_kv_len
        seq.drop_draft()
        accepted = len(verdict.path)
        seq.num_computed_tokens = root + 1 + accepted
        seq.draft_kv_len = min(draft_kv, seq.num_computed_tokens)
        depth = max(draft.depths(), default=0)
        self._tracker(seq).update(depth, accepted)
        expected = self._expected.pop(seq.request_id, None)
        if expected is not None:
            calib = self._calibration.setdefault(seq.request_id, [0.0, 0.0])
            calib[0] = CALIBRATION_DECAY * calib[0] + accepted
            calib[1] = CALIBRATION_DECAY * calib[1] + expected
        m = seq.metrics
        m.spec_num_drafts += 1
        m.spec_draft_tokens += len(draft)
        m.spec_accepted_tokens += accepted
        if len(m.spec_accepted_per_pos) < depth:
            m.spec_accepted_per_pos.extend([0] * (depth - len(m.spec_accepted_per_pos)))
        for pos in range(accepted):
            m.spec_accepted_per_pos[pos] += 1
        return verdict

    def after_emit(self, seq: Sequence) -> None:
        """The verdict's tokens are appended: return blocks past them, publish full ones."""
        if seq.is_finished:
            return
        self.blocks.trim(seq, len(seq))
        self.blocks.commit(seq)

    def _compact(self, seq: Sequence, root: int, path: list[int]) -> None:
        """Move the KV of accepted tree nodes to the positions of the chain they form."""
        bs = self.blocks.block_size
        table = seq.block_table

        def slot(p: int) -> int:
            return table[p // bs] * bs + p % bs

        src = [slot(root + 1 + node) for node in path]
        dst = [slot(root + 1 + i) for i in range(len(path))]
        if src == dst:
            return
        device = self.cache.keys[0].device
        src_t = torch.tensor(src, device=device)
        dst_t = torch.tensor(dst, device=device)
        for layer in (*self.cache.keys, *self.cache.values):
            hkv, n, b, d = layer.shape
            flat = layer.view(hkv, n * b, d)
            flat.index_copy_(1, dst_t, flat.index_select(1, src_t))

    def _tracker(self, seq: Sequence) -> AcceptanceTracker:
        tracker = self._trackers.get(seq.request_id)
        if tracker is None:
            tracker = AcceptanceTracker(PRIOR_ACCEPTANCE.get(seq.metrics.method, 0.5))
            self._trackers[seq.request_id] = tracker
        return tracker

