"""Each round's draft tree (`--draft-tree`): a fixed shape, or with `auto` the shape chosen the way
adaptive K chooses K (policy.py), from the target's verify cost curve and what rounds observe.

A round with a tree of n nodes costs the target one forward pass over n + 1 tokens per sequence,
T(B * (n + 1)) for a batch of B, plus the draft's time to grow it, and commits the accepted path
and one token. With `auto`, the candidates are the chain that the request's K policy picks this
round and a ladder of dynamic trees (`LADDER`, 7, 15 and 31 nodes); each has an estimated
throughput B * tokens per round / (T + draft time), the chain's from the acceptance model of
policy.py, a tree's from the tokens its own rounds committed (decayed sums, shared by all requests
of the orchestrator like the load estimates). Each tree is tried for EXPLORE_ROUNDS rounds first;
afterwards the best candidate drafts, and every REEXPLORE_EVERY rounds the runner-up (chain or
tree) gets one round, so that a change of load or text is noticed. Where the verify is flat (a GPU;
bf16 on a CPU with AMX) a wide tree costs about what a chain costs and wins; where it grows with
the tokens scored (fp32 or the GGUF formats on a CPU) the chain, or no drafting at all, does.

The tree never affects exactness: every round's tokens are the target's, whatever was drafted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.policy import LoadEstimates, expected_tokens
from specdec.trees import TreeShape

# (depth, shape): EAGLE-2-style dynamic trees (the 8 likeliest children of the root, then the 4 likeliest
# nodes of each depth expanded with 4 children each), of the shape that did best in bench.trees
LADDER = ((4, TreeShape((8, 4), 7)), (4, TreeShape((8, 4), 15)), (5, TreeShape((8, 4), 31)))
EXPLORE_ROUNDS = 8
REEXPLORE_EVERY = 64
DECAY = 0.99  # per observed round of the same shape


class FixedTree:
    """The same shape every round that drafts, as deep as that round's K."""

    def __init__(self, shape: TreeShape):
        self.shape = shape

    def choose(self, k: int) -> tuple[int, TreeShape | None]:
        return k, self.shape

    def observe(self, shape: TreeShape | None, committed: int, draft_s: float) -> None:
        pass


@dataclass
class _Observed:
    rounds: float = 0.0  # decayed
    committed: float = 0.0  # decayed tokens
    draft_s: float | None = None  # moving average of the draft's time per round
    tries: int = 0  # rounds ever drafted with it


@dataclass
class TreeChooser:
    """Shared by all requests of one orchestrator (`--draft-tree auto`)."""

    load: LoadEstimates
    max_nodes: int  # the target's limit (its max_speculative_tokens)
    candidates: tuple[tuple[int, TreeShape], ...] = LADDER
    observed: dict[TreeShape | None, _Observed] = field(default_factory=dict)
    rounds: int = 0

    def __post_init__(self):
        self.candidates = tuple((d, s) for d, s in self.candidates if s.nodes(d) <= self.max_nodes)
        self.observed = {shape: _Observed() for _, shape in (*self.candidates, (0, None))}  # None: the chains

    def _cost(self, tokens: int, draft_s: float) -> float:
        batch = max(self.load.batch_size, 1.0)
        return (self.load.curve_scale * self.load.curve(batch * tokens) + draft_s) / batch

    def chain_throughput(self, k: int) -> float:
        """From the chain rounds' own tokens once there are some, else the acceptance model."""
        seen = self.observed[None]
        tokens = seen.committed / seen.rounds if seen.rounds else expected_tokens(self.load.acceptance, k)
        draft_s = seen.draft_s if seen.draft_s is not None else k * (self.load.draft_s_per_token or 0.0)
        return tokens / max(self._cost(k + 1, draft_s), 1e-9)

    def tree_throughput(self, depth: int, shape: TreeShape) -> float:
        seen = self.observed[shape]
        tokens = seen.committed / seen.rounds if seen.rounds else 1.0
        return tokens / max(self._cost(shape.nodes(depth) + 1, seen.draft_s or 0.0), 1e-9)

    def choose(self, k: int) -> tuple[int, TreeShape | None]:
        """This round's (depth, shape), or (k, None) for the chain the K policy picked; K = 0
        (speculation does not pay at all) drafts nothing."""
        if k == 0 or not self.candidates or not self.load.curve:
            return k, None
        self.rounds += 1
        for depth, shape in self.candidates:
            if self.observed[shape].tries < EXPLORE_ROUNDS:
                return depth, shape
        options = [(self.chain_throughput(k), (k, None))] + [(self.tree_throughput(*c), c) for c in self.candidates]
        options.sort(key=lambda option: option[0], reverse=True)  # stable: the chain wins ties
        return options[1][1] if self.rounds % REEXPLORE_EVERY == 0 else options[0][1]

    def observe(self, shape: TreeShape | None, committed: int, draft_s: float) -> None:
        """A drafting round's outcome: its tree (None: a chain), tokens committed, draft time."""
        seen = self.observed.get(shape)
        if seen is None:
            return
        seen.tries += 1
        seen.rounds = seen.rounds * DECAY + 1
        seen.committed = seen.committed * DECAY + committed
        seen.draft_s = draft_s if seen.draft_s is None else seen.draft_s + 0.1 * (draft_s - seen.draft_s)


TreeChoice = FixedTree | TreeChooser


def tree_choice(spec: str, load: LoadEstimates, max_nodes: int) -> TreeChoice | None:
    """--draft-tree's value: '' (chains), 'auto', or a shape (TreeShape.parse)."""
    if spec == "auto":
        return TreeChooser(load, max_nodes)
    shape = TreeShape.parse(spec)
    return FixedTree(shape) if shape is not None else None
