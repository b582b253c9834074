"""Growing a draft tree from a model's next-token scores, depth by depth (static and EAGLE-2's
dynamic shape, specdec/trees.py's TreeShape), for any drafter that can score several nodes.

A node's children are the draft's likeliest next tokens (a deterministic choice: point masses,
exact at any temperature). Its score is the log-probability of its whole path under the draft
(EAGLE-2's "confidence"). Static: every node at depth d gets width(d) children. Dynamic: only the
width(d) best-scored nodes of depth d are expanded, and at the end the max_nodes best-scored nodes
are kept; a node never scores above its parent, so the kept set is closed under ancestry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from specdec.trees import TreeShape


@dataclass
class Tree:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # log-probability of each node's path

    def add(self, token: int, parent: int, score: float) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.scores.append(score)
        return len(self.tokens) - 1

    def kept(self, max_nodes: int) -> "Tree":
        """The max_nodes best-scored nodes (ties: the earlier), renumbered in their old order."""
        if not max_nodes or len(self.tokens) <= max_nodes:
            return self
        best = sorted(sorted(range(len(self.tokens)), key=lambda i: (-self.scores[i], i))[:max_nodes])
        index = {old: new for new, old in enumerate(best)}
        tree = Tree()
        for old in best:
            tree.add(self.tokens[old], index[self.parents[old]] if self.parents[old] >= 0 else -1, self.scores[old])
        return tree


def likeliest(log_probs: torch.Tensor, width: int, token_ids: Callable[[torch.Tensor], torch.Tensor]) -> list[tuple[int, float]]:
    """The `width` likeliest next tokens, (token id, log-probability), likeliest first; tokens with
    probability 0 are never children. log_probs: [V'] over head rows, mapped to ids by token_ids."""
    top = torch.topk(log_probs, min(width, log_probs.shape[-1]))
    rows = top.indices[top.values > float("-inf")]
    return list(zip(token_ids(rows).tolist(), top.values[: len(rows)].tolist()))


def grow(shape: TreeShape, depth: int, root: list[tuple[int, float]], expand: Callable[[Tree, list[int]], list[list[tuple[int, float]]]]) -> Tree:
    """A tree `depth` deep: `root` holds the root's candidate children (token, log-probability),
    likeliest first; `expand(tree, nodes)` gives each node's candidates."""
    tree = Tree()
    frontier = [tree.add(token, -1, score) for token, score in root[: shape.width(0)]]
    for d in range(1, depth):
        if shape.max_nodes:  # EAGLE-2: expand the best-scored nodes of this depth only
            frontier = sorted(sorted(frontier, key=lambda i: (-tree.scores[i], i))[: shape.width(d)])
        if not frontier:
            break
        new = []
        for node, candidates in zip(frontier, expand(tree, frontier)):
            new += [tree.add(token, node, tree.scores[node] + score) for token, score in candidates[: shape.width(d)]]
        frontier = new
    return tree.kept(shape.max_nodes)


def pruned(tree: Tree, nodes: list[int]) -> tuple[list[int], list[int], list[int]]:
    """The sub-tree of `nodes` and their ancestors: its tokens, parents (renumbered) and old
    indices, in the tree's order (so `nodes`, the deepest, come last when they share a depth)."""
    keep = set()
    for node in nodes:
        while node >= 0 and node not in keep:
            keep.add(node)
            node = tree.parents[node]
    order = sorted(keep)
    index = {old: new for new, old in enumerate(order)}
    return [tree.tokens[i] for i in order], [index.get(tree.parents[i], -1) for i in order], order
