"""Counted n-gram tries: what most often followed a context, as a multi-branch draft.

The data structure of Alipay's Lookahead (KDD 2024). Every n-gram of a token stream (up to
`max_match + branch_length` tokens, from every start position) is a path from the root, and each
node counts how often its path occurred. To draft, a suffix of the context (at most `max_match`
tokens) is matched to a path and the likeliest nodes below it become the draft tree, best first:
what followed this context most often, in as many branches as it had.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable, Iterator, Sequence

from baton.actors.draft_tree import DraftTree
from baton.errors import ConfigError

_NONE = -1


class TokenTrie:
    """Counted n-grams of token streams; drafts what most often followed a context.

    Paths are up to `max_match + branch_length` tokens, so even the longest match leaves a full
    branch below it. With a `capacity` (in nodes), going over it ages the trie until it holds
    15/16 of that: branches (all paths that start with one token) are visited in turn, every count
    in them is halved and nodes whose count reaches zero are dropped with their subtrees. What
    keeps being seen stays; what was seen once and not since goes first. A prune stops as soon as
    a sixteenth of the capacity is free, so it costs the branches it visits, not a whole pass.

    Nodes are numbers indexing flat lists (token, count, first child, next sibling), found through
    two int -> int dicts, rather than an object each: a few hundred thousand node objects made
    Python's garbage collector walk them all again and again, which cost more than the trie's own
    work. Token ids must be non-negative and below 2**32.
    """

    def __init__(self, branch_length: int = 8, max_match: int = 4, capacity: int | None = None):
        if branch_length < 1 or max_match < 1:
            raise ConfigError(
                f"branch_length and max_match must be >= 1, got {branch_length}, {max_match}"
            )
        if capacity is not None and capacity < 1:
            raise ConfigError(f"capacity must be None or >= 1 nodes, got {capacity}")
        self.branch_length = branch_length
        self.max_match = max_match
        self.depth = max_match + branch_length
        self.capacity = capacity
        self.size = 0  # nodes, the root excluded
        self.epoch = 0  # bumped when nodes are dropped: writers re-find their open paths
        self._tok: list[int] = []
        self._freq: list[int] = []
        self._first: list[int] = []  # first child, _NONE for a leaf
        self._next: list[int] = []  # next sibling
        self._top: dict[int, int] = {}  # token -> node, for the root's children
        # token << 32 | parent -> node, for all other nodes. A dict probes by a key's low bits:
        # with the parent there, keys spread out; with the token there, they pile up.
        self._edges: dict[int, int] = {}
        self._free: list[int] = []  # numbers of dropped nodes, for reuse
        self._sweep: deque[int] = deque()  # first tokens whose branches the next prune ages

    def __len__(self) -> int:
        return self.size

    def writer(self) -> TrieWriter:
        """A writer that counts the n-grams of one growing stream, a few tokens at a time."""
        return TrieWriter(self)

    def insert(self, tokens: Sequence[int]) -> None:
        """Count the n-grams of `tokens` from every start position."""
        self.writer().extend(tokens)

    def match_length(self, context: Sequence[int]) -> int:
        """Length of the longest suffix of `context` (<= max_match) with something after it."""
        for m in range(min(self.max_match, len(context)), 0, -1):
            node = self._find(context[len(context) - m :])
            if node != _NONE and self._first[node] != _NONE:
                return m
        return 0

    def continuations(
        self, context: Sequence[int], match_len: int, limit: int
    ) -> Iterator[tuple[int, int]]:
        """What followed the last `match_len` tokens of `context`, most likely node first.

        Yields up to `limit` pairs `(parent, token)`: `parent` is the position of an earlier pair
        (-1: a child of the matched path), so parents always come first. A node's likelihood is
        its path's share of the matched path's count (its parent's times its own count over its
        parent's), which only shrinks going down. Ties go to the node pushed first: shallower,
        then the branch seen most recently.

        A path `branch_length` deep goes on from what followed its own last `max_match` tokens,
        so a long span repeated from the prompt is drafted as far as `limit` allows, while the
        trie stores paths of a bounded length.
        """
        node = self._find(context[len(context) - match_len :]) if match_len > 0 else _NONE
        if node == _NONE or limit < 1:
            return
        freq, first, nxt, tok = self._freq, self._first, self._next, self._tok
        heap: list[tuple[float, int, int, int, int]] = []  # (-likelihood, order, at, depth, node)
        order = 0
        tokens: list[int] = []  # what was yielded, to re-match a path's last tokens
        parents: list[int] = []

        def push(parent: int, at: int, depth: int, share: float) -> None:
            nonlocal order
            kids = []
            c = first[parent]
            while c != _NONE:
                kids.append(c)
                c = nxt[c]
            if len(kids) > limit:
                kids = heapq.nlargest(limit, kids, key=freq.__getitem__)  # only these can fit
            scale = share / freq[parent]
            for c in kids:
                heapq.heappush(heap, (-freq[c] * scale, order, at, depth, c))
                order += 1

        push(node, -1, 1, 1.0)
        for pos in range(limit):
            if not heap:
                return
            neg, _, parent, depth, c = heapq.heappop(heap)
            tokens.append(tok[c])
            parents.append(parent)
            yield parent, tok[c]
            if depth >= self.branch_length:
                c = self._find(self._tail(context, tokens, parents))
                depth = 0
            if c != _NONE and first[c] != _NONE:
                push(c, pos, depth + 1, -neg)

    def _tail(self, context: Sequence[int], tokens: list[int], parents: list[int]) -> list[int]:
        """The last `max_match` tokens of `context` followed by the path to the newest node."""
        out: list[int] = []
        at = len(tokens) - 1
        while at >= 0 and len(out) < self.max_match:
            out.append(tokens[at])
            at = parents[at]
        need = self.max_match - len(out)
        if need > 0:
            out.extend(reversed(context[max(0, len(context) - need) :]))
        return out[::-1]

    def retrieve(self, prefix_tokens: Sequence[int], max_nodes: int) -> DraftTree | None:
        """A draft of at most `max_nodes` tokens continuing `prefix_tokens`; None if none matches.

        The longest suffix (<= max_match tokens) that was seen with a continuation is matched;
        its likeliest continuation nodes form the tree (one chain when only one branch exists).
        """
        draft = DraftBuilder(max_nodes)
        draft.merge(self.continuations(prefix_tokens, self.match_length(prefix_tokens), max_nodes))
        return draft.build()

    def prune(self) -> None:
        """Age branches in turn until the trie is within 15/16 of its capacity (no-op if it is)."""
        if self.capacity is None or self.size <= self.capacity:
            return
        target = self.capacity - self.capacity // 16
        while self.size > target:
            if not self._sweep:
                self._sweep.extend(self._top)
                if not self._sweep:
                    break
            token = self._sweep.popleft()
            if token in self._top:
                self._age(token)
        self.epoch += 1

    def violations(self) -> list[str]:
        """Every way the trie's invariants fail (empty when they hold).

        `size` counts every node and every edge; every count is positive and at most its
        parent's; no path is longer than `max_match + branch_length`.
        """
        out: list[str] = []
        count = 0
        stack = [(t, n, 1) for t, n in self._top.items()]
        while stack:
            token, node, depth = stack.pop()
            count += 1
            f = self._freq[node]
            if self._tok[node] != token or f < 1:
                out.append(f"node {node}: token {self._tok[node]} (edge {token}), count {f}")
            if depth > self.depth:
                out.append(f"a path of {depth} tokens (at most {self.depth})")
            for c in self._kids(node):
                if self._edges.get(self._tok[c] << 32 | node) != c:
                    out.append(f"node {c}: no edge from its parent {node}")
                if self._freq[c] > f:
                    out.append(f"node {c}: count {self._freq[c]} under count {f}")
                stack.append((self._tok[c], c, depth + 1))
        if not count == len(self._top) + len(self._edges) == self.size:
            out.append(f"size says {self.size}, found {count} nodes, {len(self._edges)} edges")
        return out

    def _kids(self, node: int) -> Iterator[int]:
        c = self._first[node]
        while c != _NONE:
            yield c
            c = self._next[c]

    def _find(self, path: Sequence[int]) -> int:
        if not path:
            return _NONE
        node = self._top.get(path[0], _NONE)
        edges = self._edges
        for i in range(1, len(path)):
            if node == _NONE:
                break
            node = edges.get(path[i] << 32 | node, _NONE)
        return node

    def _add_top(self, token: int) -> int:
        """The root's child for `token` (created if new), its count raised by one."""
        node = self._top.get(token)
        if node is None:
            node = self._top[token] = self._new(token)
        self._freq[node] += 1
        return node

    def _new(self, token: int) -> int:
        """A fresh node with count 0; the caller files it under its parent."""
        self.size += 1
        if self._free:
            n = self._free.pop()
            self._tok[n], self._freq[n], self._first[n] = token, 0, _NONE
            return n
        self._tok.append(token)
        self._freq.append(0)
        self._first.append(_NONE)
        self._next.append(_NONE)
        return len(self._tok) - 1

    def _age(self, token: int) -> None:
        """Halve every count in one branch; drop nodes that reach zero, with their subtrees."""
        freq, first, nxt, tok, edges = self._freq, self._first, self._next, self._tok, self._edges
        top = self._top[token]
        freq[top] >>= 1
        if freq[top] == 0:
            del self._top[token]
            self._free_subtree(top)
            return
        stack = [top]
        while stack:
            node = stack.pop()
            before, c = _NONE, first[node]
            while c != _NONE:
                after = nxt[c]
                freq[c] >>= 1
                if freq[c]:
                    stack.append(c)
                    before = c
                else:  # unlink c from its siblings, free it and all below
                    if before == _NONE:
                        first[node] = after
                    else:
                        nxt[before] = after
                    del edges[tok[c] << 32 | node]
                    self._free_subtree(c)
                c = after

    def _free_subtree(self, node: int) -> None:
        """Free `node` (already cut from its parent) and every node below it."""
        first, nxt, tok, edges, free = self._first, self._next, self._tok, self._edges, self._free
        stack = [node]
        n_freed = len(free)
        while stack:
            n = stack.pop()
            c = first[n]
            while c != _NONE:
                del edges[tok[c] << 32 | n]
                stack.append(c)
                c = nxt[c]
            free.append(n)
        self.size -= len(free) - n_freed


class TrieWriter:
    """Counts the n-grams of one growing token stream into a trie, O(depth) work per token.

    It keeps the open paths (the n-grams that start in the last depth-1 tokens) so each new
    token extends every one of them by a single step instead of walking them again.
    """

    __slots__ = ("trie", "_window", "_open", "_epoch")

    def __init__(self, trie: TokenTrie) -> None:
        self.trie = trie
        self._window: list[int] = []  # the last depth-1 tokens
        self._open: list[int] = []  # _open[k]: the node of path _window[k:] (_NONE: pruned)
        self._epoch = trie.epoch

    def extend(self, tokens: Iterable[int]) -> None:
        trie = self.trie
        # Find-or-add each open path's child, inlined with the lists bound locally: the hot path.
        edges, freq, first, nxt, new = trie._edges, trie._freq, trie._first, trie._next, trie._new
        keep = trie.depth - 1
        capacity = trie.capacity
        window = self._window
        for t in tokens:
            if self._epoch != trie.epoch:
                self._refind()
            grown = []
            for node in self._open:
                if node == _NONE:
                    grown.append(_NONE)
                    continue
                key = t << 32 | node
                child = edges.get(key)
                if child is None:
                    child = edges[key] = new(t)
                    nxt[child] = first[node]
                    first[node] = child
                freq[child] += 1
                grown.append(child)
            grown.append(trie._add_top(t))
            window.append(t)
            if len(window) > keep:  # the longest path is complete: it grows no further
                del window[0]
                del grown[0]
            self._open = grown
            if capacity is not None and trie.size > capacity:
                trie.prune()

    def _refind(self) -> None:
        """Pruning may have dropped (and reused) open paths' nodes: look them up again."""
        w = self._window
        self._open = [self.trie._find(w[k:]) for k in range(len(w))]
        self._epoch = self.trie.epoch


class DraftBuilder:
    """Merges continuations from several tries and match lengths into one tree of bounded size.

    A path already in the tree costs nothing, so a later source can still add children below it.
    """

    __slots__ = ("max_nodes", "tokens", "parents", "_index")

    def __init__(self, max_nodes: int) -> None:
        self.max_nodes = max_nodes
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self._index: dict[tuple[int, int], int] = {}  # (parent, token) -> node

    @property
    def full(self) -> bool:
        return len(self.tokens) >= self.max_nodes

    def merge(self, items: Iterable[tuple[int, int]]) -> None:
        where: list[int] = []  # item position -> node in this tree
        for parent, token in items:
            key = (where[parent] if parent >= 0 else -1, token)
            node = self._index.get(key)
            if node is None:
                if self.full:
                    return
                node = self._index[key] = len(self.tokens)
                self.tokens.append(token)
                self.parents.append(key[0])
            where.append(node)

    def build(self) -> DraftTree | None:
        return DraftTree(self.tokens, self.parents) if self.tokens else None
