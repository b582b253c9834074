"""Prompt-lookup drafting (Saxena 2023): find the sequence's last n tokens earlier in the sequence
and propose what followed them. No model, no state beyond the token ids.

The reference behaviour is Hugging Face's `prompt_lookup_num_tokens` (PromptLookupCandidateGenerator):
try n from `max_ngram` down to `min_ngram`, take the earliest earlier occurrence that has a
continuation, and propose up to K tokens of it. Proposals are deterministic, so when sampling the
draft distribution is a point mass on each proposed token, which keeps speculative sampling exact.
"""

from __future__ import annotations

from draft_service.drafters.base import Drafter, DraftSession
from specdec.messages import Proposal, ProposeWork


def lookup(ids: list[int], num_tokens: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Up to `num_tokens` tokens that followed the earliest earlier occurrence of the last n-gram."""
    length = len(ids)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        tail = ids[length - n :]
        for start in range(0, length - n):
            if ids[start : start + n] == tail:
                continuation = ids[start + n : min(start + n + num_tokens, length)]
                if continuation:
                    return continuation
    return []


def continuations(ids: list[int], depth: int, max_nodes: int, max_ngram: int = 3, min_ngram: int = 1) -> tuple[list[int], list[int]]:
    """A tree (tokens, parents) of what followed every earlier occurrence of the last n-gram (the
    longest n with one), up to `depth` tokens each, merged where they agree (a trie), the earliest
    occurrence first as `lookup` takes it, until `max_nodes` nodes."""
    length = len(ids)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        tail = ids[length - n :]
        starts = [s + n for s in range(0, length - n) if ids[s : s + n] == tail]
        if not starts:
            continue
        tokens, parents, child = [], [], {}  # child: (parent, token) -> node
        for start in starts:
            parent = -1
            for token in ids[start : min(start + depth, length)]:
                if (parent, token) not in child:
                    if len(tokens) == max_nodes:
                        return tokens, parents
                    child[(parent, token)] = len(tokens)
                    tokens.append(token)
                    parents.append(parent)
                parent = child[(parent, token)]
        if tokens:
            return tokens, parents
    return [], []


class NGramDrafter(Drafter):
    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, sessions: list[DraftSession], work: list[ProposeWork]) -> tuple[list[Proposal], int]:
        return [self._proposal(s.ids, w) for s, w in zip(sessions, work)], 0

    def _proposal(self, ids: list[int], work: ProposeWork) -> Proposal:
        if work.tree is None:
            return Proposal(lookup(ids, work.num_speculative_tokens, self.max_ngram, self.min_ngram))
        tokens, parents = continuations(ids, work.num_speculative_tokens, work.tree.nodes(work.num_speculative_tokens), self.max_ngram, self.min_ngram)
        return Proposal(tokens, None, parents)
