"""A speculative draft: candidate tokens arranged as a tree rooted at the last verified token.

A chain (`parents = [-1, 0, 1, ...]`) is the classic draft of prompt lookup or a draft model;
a wider tree (several children per node) is what lookahead and Medusa propose, all verified in one
forward pass under a tree attention mask. Nodes are listed so that every parent precedes its
children. `probs[i]`, when given, is the draft distribution node `i` was sampled from (a draft
model's); without it a node is a deterministic guess (prompt lookup, a trie, the top-k of a head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for annotations: the router and the CLI import this without torch
    import torch


@dataclass(slots=True)
class DraftTree:
    tokens: list[int]
    parents: list[int]
    probs: torch.Tensor | None = None  # [len(tokens), vocab] or None

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError("a draft needs one parent per token")
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise ValueError(f"node {i}: parent {p} must be -1 or an earlier node")

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def chain(cls, tokens: list[int], probs: torch.Tensor | None = None) -> DraftTree:
        return cls(list(tokens), list(range(-1, len(tokens) - 1)), probs)

    def prefix(self, n: int) -> DraftTree:
        """The first `n` nodes: a tree too, since parents precede their children."""
        return DraftTree(self.tokens[:n], self.parents[:n],
                         None if self.probs is None else self.probs[:n])

    @property
    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def depths(self) -> list[int]:
        """Depth of each node: 1 for a child of the root."""
        out: list[int] = []
        for p in self.parents:
            out.append(1 if p < 0 else out[p] + 1)
        return out

    def children(self, node: int) -> list[int]:
        """Children of `node` (-1: the root), in list order."""
        return [i for i, p in enumerate(self.parents) if p == node]
