"""The `lookahead` method's drafts: a trie per request plus one shared by a worker's requests.

Each request's own trie holds its prompt and output (spans the output copies from the prompt, or
repeats of itself); the shared trie holds every request's output, bounded and frequency-pruned,
so phrases the worker keeps generating are drafted for requests that never saw them.
"""

from __future__ import annotations

from dataclasses import dataclass

from baton.actors.draft_tree import DraftTree
from baton.actors.token_trie import DraftBuilder, TokenTrie, TrieWriter
from baton.errors import InvalidRequestError, RequestNotFoundError


@dataclass(slots=True)
class _Request:
    trie: TokenTrie
    own: TrieWriter  # into `trie`
    shared: TrieWriter  # into the proposer's shared trie


class LookaheadProposer:
    """The `lookahead` method's drafts for one engine worker.

    The engine calls `start` when a request begins decoding, `extend` with the tokens it accepted
    (every step, before the next `propose`), `propose` for the next draft, and `finish` when the
    request ends for any reason. Each request has its own trie (prompt and output) and all of
    them feed one shared trie with their outputs (and the prompt's last `max_match` tokens, so
    the shared trie learns how outputs begin). Drafts prefer the longer match, and at equal match
    length the request's own trie; leftover room is filled from shorter matches.

    Options: `max_match` (4) is the longest context suffix matched: longer ones tell apart the
    places a span occurs. `branch_length` (8) is how deep a draft follows one stored path before
    it re-matches its own last tokens; the tries store paths of `max_match + branch_length`
    tokens, about 9 nodes of 130 bytes per token of new text. `shared_capacity` (2**18 nodes,
    about 33 MiB) bounds the shared trie, `request_capacity` (2**17, about 17 MiB, some 13k
    tokens of new text) each request's own.
    """

    def __init__(
        self,
        branch_length: int = 8,
        max_match: int = 4,
        shared_capacity: int = 1 << 18,
        request_capacity: int = 1 << 17,
    ) -> None:
        self.branch_length = branch_length
        self.max_match = max_match
        self.request_capacity = request_capacity
        self.shared = TokenTrie(branch_length, max_match, shared_capacity)
        self._requests: dict[str, _Request] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    def start(self, request_id: str, prompt_ids: list[int]) -> None:
        if request_id in self._requests:
            raise InvalidRequestError(f"lookahead: request id {request_id!r} is already started")
        trie = TokenTrie(self.branch_length, self.max_match, self.request_capacity)
        req = _Request(trie, trie.writer(), self.shared.writer())
        req.own.extend(prompt_ids)
        req.shared.extend(prompt_ids[-self.max_match :])
        self._requests[request_id] = req

    def extend(self, request_id: str, new_token_ids: list[int]) -> None:
        req = self._get(request_id)
        req.own.extend(new_token_ids)
        req.shared.extend(new_token_ids)

    def propose(self, request_id: str, context_ids: list[int], max_nodes: int) -> DraftTree | None:
        """At most `max_nodes` draft tokens continuing `context_ids`; None if nothing matches."""
        req = self._get(request_id)
        draft = DraftBuilder(max_nodes)
        for m in range(min(self.max_match, len(context_ids)), 0, -1):
            for trie in (req.trie, self.shared):
                if draft.full:
                    return draft.build()
                draft.merge(trie.continuations(context_ids, m, max_nodes))
        return draft.build()

    def forget_shared(self) -> None:
        """Start the shared trie afresh: what earlier requests generated is no longer drafted
        (requests in flight feed the new one from here on)."""
        self.shared = TokenTrie(self.branch_length, self.max_match, self.shared.capacity)
        for req in self._requests.values():
            req.shared = self.shared.writer()

    def finish(self, request_id: str) -> None:
        """Drop the request's own trie (what it taught the shared trie stays); unknown ids pass."""
        self._requests.pop(request_id, None)

    def _get(self, request_id: str) -> _Request:
        req = self._requests.get(request_id)
        if req is None:
            raise RequestNotFoundError(f"lookahead: no started request {request_id!r}")
        return req
