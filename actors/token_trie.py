"""Counted n-gram tries: what most often followed a context, as a multi-branch draft.

The data structure of Alipay's Lookahead (KDD 2024). Every n-gram of a token stream (up to
`max_match + branch_length` tokens, from every start position) is a path from the root, and each
node counts how often its path occurred. To draft, a suffix of the context (at most `max_match`
tokens) is matched to a path and the most frequent nodes below it become the draft tree, best
first: what followed this context most often, in as many branches as it had.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable, Iterator, Sequence

from baton.actors.draft_tree import DraftTree
from baton.errors import ConfigError


class _Node:
    """A trie node: the token on the edge into it, how often its path was seen, its children.

    `kids` is None (a leaf), the only child itself, or a dict token -> child. Most nodes of n-grams
    from running text have one child, and a dict on each would triple the trie's memory.
    """

    __slots__ = ("token", "freq", "kids")

    def __init__(self, token: int) -> None:
        self.token = token
        self.freq = 0
        self.kids: _Node | dict[int, _Node] | None = None

    def child(self, token: int) -> _Node | None:
        kids = self.kids
        if kids is None:
            return None
        if isinstance(kids, _Node):
            return kids if kids.token == token else None
        return kids.get(token)

    def children(self) -> Iterable[_Node]:
        kids = self.kids
        if kids is None:
            return ()
        return (kids,) if isinstance(kids, _Node) else kids.values()

    def drop(self, token: int) -> None:
        kids = self.kids
        if isinstance(kids, dict):
            del kids[token]
            if len(kids) == 1:
                self.kids = next(iter(kids.values()))
        elif kids is not None and kids.token == token:
            self.kids = None

    def set_children(self, kept: list[_Node]) -> None:
        if not kept:
            self.kids = None
        elif len(kept) == 1:
            self.kids = kept[0]
        else:
            self.kids = {k.token: k for k in kept}

    def subtree_size(self) -> int:
        n, stack = 0, [self]
        while stack:
            node = stack.pop()
            n += 1
            stack.extend(node.children())
        return n


class TokenTrie:
    """Counted n-grams of token streams; drafts what most often followed a context.

    Paths are up to `max_match + branch_length` tokens, so even the longest match leaves a full
    branch below it. With a `capacity` (in nodes), going over it ages the trie until it holds
    7/8 of that: branches are visited in turn, every count in them is halved and nodes whose count
    reaches zero are dropped with their subtrees. What keeps being seen stays; what was seen once
    and not since goes first. A prune stops as soon as an eighth of the capacity is free, so it
    costs the branches it visits, not a pass over the whole trie.
    """

    def __init__(self, branch_length: int = 12, max_match: int = 4, capacity: int | None = None):
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
        self._root = _Node(-1)
        self._sweep: deque[int] = deque()  # first tokens whose branches the next prune ages

    def __len__(self) -> int:
        return self.size

    def writer(self) -> TrieWriter:
        """A writer that counts the n-grams of one growing stream, a few tokens at a time."""
        return TrieWriter(self)

    def insert(self, tokens: Sequence[int]) -> None:
        """Count the n-grams of `tokens` from every start position."""
        self.writer().extend(tokens)

    def violations(self) -> list[str]:
        """Every way the trie's invariants fail (empty when they hold).

        `size` counts every node; every count is positive and at most its parent's; no path is
        longer than `max_match + branch_length`; each child sits under its own token.
        """
        out: list[str] = []
        count = 0
        stack: list[tuple[_Node, int]] = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            if isinstance(node.kids, dict) and len(node.kids) < 2:
                out.append(f"a node at depth {depth} keeps a dict of {len(node.kids)} children")
            if isinstance(node.kids, dict):
                out.extend(
                    f"child {k.token} filed under {t}" for t, k in node.kids.items() if k.token != t
                )
            for kid in node.children():
                count += 1
                if kid.freq < 1 or (depth > 0 and kid.freq > node.freq):
                    out.append(f"count {kid.freq} at depth {depth + 1} under count {node.freq}")
                if depth + 1 > self.depth:
                    out.append(f"a path of {depth + 1} tokens (at most {self.depth})")
                stack.append((kid, depth + 1))
        if count != self.size:
            out.append(f"size says {self.size} nodes, the trie has {count}")
        return out

    def _find(self, path: Sequence[int]) -> _Node | None:
        node = self._root
        for t in path:
            nxt = node.child(t)
            if nxt is None:
                return None
            node = nxt
        return node

    def match_length(self, context: Sequence[int]) -> int:
        """Length of the longest suffix of `context` (<= max_match) with something after it."""
        for m in range(min(self.max_match, len(context)), 0, -1):
            node = self._find(context[len(context) - m :])
            if node is not None and node.kids is not None:
                return m
        return 0

    def continuations(
        self, context: Sequence[int], match_len: int, limit: int
    ) -> Iterator[tuple[int, int]]:
        """What followed the last `match_len` tokens of `context`, most frequent node first.

        Yields up to `limit` pairs `(parent, token)`: `parent` is the position of an earlier pair
        (-1: a child of the matched path), so parents always come first. Counts only shrink going
        down, so best first is also what a path's own count estimates: its chance of acceptance.
        Ties go to the shallower node, then to the one seen first.
        """
        node = self._find(context[len(context) - match_len :]) if match_len > 0 else None
        max_depth = min(self.branch_length, self.depth - match_len)
        if node is None or limit < 1 or max_depth < 1:
            return
        heap: list[tuple[int, int, int, int, _Node]] = []
        order = 0  # tie-break: the order nodes were pushed (shallower first, then first seen)

        def push(parent: _Node, at: int, depth: int) -> None:
            nonlocal order
            kids: Iterable[_Node] = parent.children()
            if isinstance(parent.kids, dict) and len(parent.kids) > limit:
                kids = heapq.nlargest(limit, kids, key=lambda k: k.freq)  # only these can fit
            for kid in kids:
                heapq.heappush(heap, (-kid.freq, order, at, depth, kid))
                order += 1

        push(node, -1, 1)
        for pos in range(limit):
            if not heap:
                return
            _, _, parent, depth, kid = heapq.heappop(heap)
            yield parent, kid.token
            if depth < max_depth and kid.kids is not None:
                push(kid, pos, depth + 1)

    def retrieve(self, prefix_tokens: Sequence[int], max_nodes: int) -> DraftTree | None:
        """A draft of at most `max_nodes` tokens continuing `prefix_tokens`; None if none matches.

        The longest suffix (<= max_match tokens) that was seen with a continuation is matched;
        its most frequent continuation nodes form the tree (one chain when only one branch exists).
        """
        draft = DraftBuilder(max_nodes)
        draft.merge(self.continuations(prefix_tokens, self.match_length(prefix_tokens), max_nodes))
        return draft.build()

    def _add(self, node: _Node, token: int) -> _Node:
        """The child of `node` for `token` (created if new), its count raised by one."""
        kids = node.kids
        if kids is None:
            child = node.kids = _Node(token)
            self.size += 1
        elif isinstance(kids, _Node):
            if kids.token == token:
                child = kids
            else:
                child = _Node(token)
                node.kids = {kids.token: kids, token: child}
                self.size += 1
        else:
            found = kids.get(token)
            if found is None:
                found = kids[token] = _Node(token)
                self.size += 1
            child = found
        child.freq += 1
        return child

    def prune(self) -> None:
        """Age branches in turn until the trie is within 7/8 of its capacity (no-op if it is)."""
        if self.capacity is None or self.size <= self.capacity:
            return
        target = self.capacity * 7 // 8
        root = self._root
        while self.size > target:
            if not self._sweep:
                self._sweep.extend(k.token for k in root.children())
                if not self._sweep:
                    break
            top = root.child(self._sweep.popleft())
            if top is not None:
                self._age(root, top)
        self.epoch += 1

    def _age(self, root: _Node, top: _Node) -> None:
        """Halve every count in `top`'s branch; drop nodes that reach zero, with their subtrees."""
        top.freq >>= 1
        if top.freq == 0:
            root.drop(top.token)
            self.size -= top.subtree_size()
            return
        stack = [top]
        while stack:
            node = stack.pop()
            kids = list(node.children())
            kept = []
            for kid in kids:
                kid.freq >>= 1
                if kid.freq:
                    kept.append(kid)
                else:
                    self.size -= kid.subtree_size()
            if len(kept) < len(kids):
                node.set_children(kept)
            stack.extend(kept)


class TrieWriter:
    """Counts the n-grams of one growing token stream into a trie, O(depth) work per token.

    It keeps the open paths (the n-grams that start in the last depth-1 tokens) so each new
    token extends every one of them by a single step instead of walking them again.
    """

    __slots__ = ("trie", "_window", "_open", "_epoch")

    def __init__(self, trie: TokenTrie) -> None:
        self.trie = trie
        self._window: list[int] = []  # the last depth-1 tokens
        self._open: list[_Node | None] = []  # _open[k]: the node of path _window[k:]
        self._epoch = trie.epoch

    def extend(self, tokens: Iterable[int]) -> None:
        trie = self.trie
        keep = trie.depth - 1
        capacity = trie.capacity
        window = self._window
        for t in tokens:
            if self._epoch != trie.epoch:
                self._refind()
            nxt = [trie._add(node, t) if node is not None else None for node in self._open]
            nxt.append(trie._add(trie._root, t))
            window.append(t)
            if len(window) > keep:  # the longest path is complete: it grows no further
                del window[0]
                del nxt[0]
            self._open = nxt
            if capacity is not None and trie.size > capacity:
                trie.prune()

    def _refind(self) -> None:
        """Pruning may have dropped open paths: look them up again (None where they are gone)."""
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
