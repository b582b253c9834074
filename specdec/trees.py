"""Draft trees and their exact acceptance, as pure functions (the tree analogue of sampling.py).

A draft tree is a list of draft tokens with, per token, the index of its parent among them; -1 is
the root, the last token the target already has before the drafts (the round's pending token).
Parents precede their children, so a chain of K drafts is the tree with parents -1, 0, .., K-2.
The target scores all nodes in one pass, each attending to the committed prefix and its ancestors
(lean_llama, native), at position prefix + depth: row 0 of its [n+1, V] output is the root's
prediction, row 1 + i node i's.

Acceptance walks down from the root. At each node the children are tried one after another, a
child's token x accepted with probability min(1, r(x) / q_c(x)), where r starts as the target's
p at the node and becomes norm(max(r - q_c, 0)) after each rejected child, and q_c is the
distribution the child was drawn from:
- a point mass on x when the children are a deterministic function of the context (greedy and
  n-gram drafts, the draft's top-k at any temperature): the rule then reads "accept x with
  probability r(x), else remove x from r";
- the draft's q at the parent with the earlier siblings' tokens removed and renormalised, when the
  children were sampled from q without replacement (SpecInfer's multi-step speculative sampling;
  the "recursive rejection sampling" of Jeon et al. 2024 and Sequoia).
Each try is an ordinary speculative sampling step against the current r, so whatever comes out of
a node (an accepted child, or a draw from the final r when every child is rejected, or from p when
the node has no children: the bonus token) is distributed exactly as p (Chen et al. 2023's proof,
applied once per try). Greedy is the point-mass case with p one-hot on the argmax: the child equal
to the argmax is accepted. Seed-stable sampling accepts the child equal to the target's Gumbel-max
choice at the node's position.

Uniforms: node i's acceptance test uses uniforms[i], the final draw uniforms[n]: n + 1 in all, as a
chain of n drafts. `tree_rejection_sample` is the tensor path, `reference_tree_rejection_sample`
the definition over Python floats, its oracle in tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from specdec.sampling import reference_draw, sample


@dataclass(frozen=True)
class TreeShape:
    """What tree a draft proposes (ProposeItem.tree_branching, tree_max_nodes): a node at depth d
    gets the draft's branching[d] likeliest next tokens (the last entry repeats); with max_nodes,
    only the branching[d] likeliest nodes of each depth are expanded and the max_nodes likeliest
    nodes kept (EAGLE-2's dynamic tree), else the whole static tree."""

    branching: tuple[int, ...]
    max_nodes: int = 0

    def width(self, depth: int) -> int:
        """Children per expanded node at `depth` (0: the root's)."""
        return self.branching[min(depth, len(self.branching) - 1)]

    def nodes(self, depth: int) -> int:
        """Nodes of the tree `depth` deep: max_nodes when set, else the static tree's count."""
        if self.max_nodes:
            return self.max_nodes
        total, level = 0, 1
        for d in range(depth):
            level *= self.width(d)
            total += level
        return total

    @staticmethod
    def parse(text: str) -> "TreeShape | None":
        """'4,2,1' (static) or '4,2,1/16' (dynamic, 16 nodes); '' for none."""
        if not text:
            return None
        branching, _, nodes = text.partition("/")
        shape = TreeShape(tuple(int(b) for b in branching.split(",")), int(nodes or 0))
        if min(shape.branching) < 1 or shape.max_nodes < 0:
            raise ValueError(f"a tree shape needs branching entries >= 1 and a node count >= 0, got {text!r}")
        return shape

    def __str__(self) -> str:
        return ",".join(map(str, self.branching)) + (f"/{self.max_nodes}" if self.max_nodes else "")


@dataclass(frozen=True)
class TreeVerdict:
    """Outcome of verifying one sequence's draft tree."""

    path: tuple[int, ...]  # the accepted nodes, root's child first (indices into the draft tokens)
    next_token: int  # recovered (every child of the path's last node rejected) or bonus (a leaf reached)


def chain(k: int) -> list[int]:
    """The parents of a chain of k drafts."""
    return list(range(-1, k - 1))


def is_chain(parents: Sequence[int]) -> bool:
    return all(parent == index - 1 for index, parent in enumerate(parents))


def depths(parents: Sequence[int]) -> list[int]:
    """Depth of each node: 1 for the root's children."""
    depth: list[int] = []
    for parent in parents:
        depth.append(1 if parent < 0 else depth[parent] + 1)
    return depth


def children(parents: Sequence[int], node: int) -> list[int]:
    """The children of `node` (-1: the root), in the order the draft sent them."""
    return [index for index, parent in enumerate(parents) if parent == node]


def path_to(parents: Sequence[int], node: int) -> list[int]:
    """The nodes from the root's child down to `node`, both included."""
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def check_parents(parents: Sequence[int], tokens: Sequence[int]) -> str | None:
    """What is wrong with a tree (None when nothing): each parent is -1 or an earlier node, and
    siblings carry distinct tokens (a token twice among siblings could not have been drawn
    without replacement, and a point mass twice is a wasted node)."""
    if len(parents) != len(tokens):
        return f"has {len(parents)} entries for {len(tokens)} draft tokens"
    seen = set()
    for index, parent in enumerate(parents):
        if not -1 <= parent < index:
            return f"[{index}] = {parent}: a parent is -1 (the root) or an earlier node"
        if (parent, tokens[index]) in seen:
            return f"[{index}]: token {tokens[index]} twice among the children of node {parent}"
        seen.add((parent, tokens[index]))
    return None


def greedy_tree_verify(scores: torch.Tensor, tokens: Sequence[int], parents: Sequence[int]) -> TreeVerdict:
    """Follow the target's choice (the argmax of each row) down the tree.

    scores: [n+1, V] logits (greedy) or Gumbel scores (seed-stable), row 0 the root's.
    """
    best = scores.argmax(-1).tolist()  # [n+1]
    path, node = [], -1
    while True:
        choice = best[node + 1]
        match = next((c for c in children(parents, node) if tokens[c] == choice), None)
        if match is None:
            return TreeVerdict(tuple(path), choice)
        path.append(match)
        node = match


def tree_rejection_sample(
    target_probs: torch.Tensor, tokens: Sequence[int], parents: Sequence[int], draft_probs: torch.Tensor | None, uniforms: torch.Tensor
) -> TreeVerdict:
    """Exact acceptance on a tree (see the module docstring).

    target_probs: [n+1, V] warped p, row 0 the root's and row 1 + i node i's.
    draft_probs: [n, V], row i the q node i was drawn from (siblings share their parent's q; the
    earlier siblings are removed here), or None when every node is a point mass.
    uniforms: [n+1] in [0, 1).
    """
    n = len(tokens)
    target_probs = target_probs.float().cpu()  # a few rows, walked one by one: on the CPU wherever they were scored
    draft_probs = draft_probs.float().cpu() if draft_probs is not None else None
    path, node = [], -1
    while True:
        p = target_probs[node + 1]
        residual, tried = p, []
        for child in children(parents, node):
            x = tokens[child]
            if draft_probs is None:
                q = torch.nn.functional.one_hot(torch.tensor(x), p.shape[-1]).float()
            else:
                q = draft_probs[child].float().clone()
                q[tried] = 0.0  # drawn without replacement: the siblings before it were not candidates
                q = q / q.sum()
            if uniforms[child] * q[x] < residual[x]:
                path.append(child)
                node = child
                break
            tried.append(x)
            left = (residual - q).clamp_(min=0.0)
            # a rejection means r(x) < q(x), so mass is left; only rounding can take it all
            residual = left / left.sum() if left.sum() > 0 else residual
        else:
            return TreeVerdict(tuple(path), int(sample(residual, uniforms[n])))


def reference_tree_rejection_sample(
    target_probs: torch.Tensor, tokens: list[int], parents: list[int], draft_probs: torch.Tensor | None, uniforms: list[float]
) -> TreeVerdict:
    """The definition over Python floats, one try at a time. Slow; the oracle in tests."""
    vocab = target_probs.shape[-1]
    path, node = [], -1
    while True:
        residual = target_probs[node + 1].tolist()
        removed: list[int] = []
        accepted = None
        for child in [i for i, parent in enumerate(parents) if parent == node]:
            x = tokens[child]
            if draft_probs is None:
                q = [1.0 if token == x else 0.0 for token in range(vocab)]
            else:
                q = [0.0 if token in removed else float(draft_probs[child, token]) for token in range(vocab)]
                total = sum(q)
                q = [value / total for value in q]
            if uniforms[child] < min(1.0, residual[x] / q[x]):
                accepted = child
                break
            removed.append(x)
            left = [max(r - qi, 0.0) for r, qi in zip(residual, q)]
            if sum(left) > 0:
                residual = [value / sum(left) for value in left]
        if accepted is None:
            return TreeVerdict(tuple(path), reference_draw(residual, uniforms[len(tokens)]))
        path.append(accepted)
        node = accepted

