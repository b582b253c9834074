"""Staged speculation (Spector & Ré 2023): a drafter that speculates for the drafter.

A cheap first stage (n-gram lookup, or a small draft model drafting greedily) proposes tokens to
the second stage, a `ModelDrafter`, which scores them all in one forward pass instead of one pass
per token. The second stage then draws its own token at each position exactly as it would alone
(`model.draw`: the argmax, the position-keyed Gumbel choice, or a sample with the step's uniform),
from the logits of that pass; while its token equals the first stage's, the next row's logits are
already computed. At the first difference the rows after it are stale: its cache is cut back
and the first stage proposes again from the new end, until K tokens are drawn.

Why this is exact: the first stage's proposals are deterministic, a point mass q1 on each. The
speculative-sampling rule with a point mass accepts the proposal x with probability min(1, p(x)/1)
= p(x) and otherwise draws from p with x removed and renormalized; drawing from p and comparing
with x does the same. Here it is even the very same draw: every token (and every q sent to the
target) is the one the second stage alone would produce from the same uniforms, so the target's
verification is unchanged and only the second stage's forward passes are saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from draft_service.drafters.base import Drafter, DraftSession
from draft_service.drafters.model import ModelDrafter, draw
from specdec import lm, sampling
from specdec.messages import Proposal, ProposeWork

SPEC_PREFIX = "staged:"


def parse_spec(model: str) -> tuple[str, str] | None:
    """`staged:FIRST+SECOND` -> (FIRST, SECOND); None for any other model name."""
    if not model.startswith(SPEC_PREFIX):
        return None
    first, plus, second = model[len(SPEC_PREFIX) :].partition("+")
    if not plus or not first or not second:
        raise ValueError(f"a staged drafter is 'staged:FIRST+SECOND' (e.g. staged:ngram+smollm2-draft-l6), not {model!r}")
    return first, second


@dataclass
class StagedState:
    """Per session: the first stage's own view of the sequence (its session, whose state lags or
    runs ahead of the true one), and the second stage's KV cache."""

    first: DraftSession
    cache: lm.SequenceCache = field(default_factory=lm.SequenceCache)


def common_prefix(a: list[int], b: list[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


class StagedDrafter(Drafter):
    samples = True

    def __init__(self, first: Drafter, second: ModelDrafter):
        if first.feature_layers or second.feature_layers:
            raise ValueError("staged speculation takes token drafters; feature drafters read target features")
        if first.vocab_size and first.vocab_size != second.vocab_size:
            raise ValueError(f"the stages' vocabularies differ ({first.vocab_size} and {second.vocab_size} tokens)")
        self.first, self.second = first, second
        self.name = f"{SPEC_PREFIX}{first.name}+{second.name}"
        for attribute in ("vocab_size", "vocab_fingerprint", "tokenizer", "eos_token_ids", "device"):
            setattr(self, attribute, getattr(second, attribute))

    def start(self, session: DraftSession) -> None:
        first = DraftSession(ids=list(session.ids), prompt_len=session.prompt_len)
        self.first.start(first)
        session.state = StagedState(first)
        if len(session.ids) > 1:
            lm.forward(self.second.loaded.model, [session.state.cache], [session.ids[:-1]], logits_for_last=1)

    def rollback(self, session: DraftSession, length: int) -> None:
        session.state.cache.truncate(length)

    def state_bytes(self, session: DraftSession) -> int:
        state = session.state
        return state.cache.nbytes + self.first.state_bytes(state.first) if state is not None else 0

    def bytes_per_token(self) -> int:
        return self.second.bytes_per_token() + self.first.bytes_per_token()

    def _first_stage(self, sessions: list[DraftSession], sequences: list[list[int]], wanted: list[int]) -> tuple[list[list[int]], int]:
        """The first stage's greedy proposals of up to wanted[i] tokens after sequences[i], and its
        forward passes: its session is first cut back to what it shares with the sequence."""
        firsts, works = [], []
        for session, sequence, count in zip(sessions, sequences, wanted):
            first = session.state.first
            kept = common_prefix(first.ids, sequence)
            self.first.rollback(first, kept)
            first.ids = list(sequence)
            firsts.append(first)
            works.append(ProposeWork("", kept, sequence[kept:], count, sampling.GREEDY, []))
        proposals, passes = self.first.propose(firsts, works)
        for first, proposal in zip(firsts, proposals):
            first.ids = first.ids + proposal.tokens
        return [p.tokens for p in proposals], passes

    def propose(self, sessions: list[DraftSession], work: list[ProposeWork]) -> tuple[list[Proposal], int]:
        proposals = [Proposal([], None if w.sampling.deterministic else []) for w in work]
        second = self.second
        passes = 0
        while True:
            rows = [i for i, w in enumerate(work) if len(proposals[i].tokens) < w.num_speculative_tokens]
            if not rows:
                return proposals, passes
            sequences = [sessions[i].ids + proposals[i].tokens for i in rows]
            wanted = [work[i].num_speculative_tokens - len(proposals[i].tokens) - 1 for i in rows]
            guesses, first_passes = self._first_stage([sessions[i] for i in rows], sequences, wanted)
            caches = [sessions[i].state.cache for i in rows]
            feeds = [sequence[cache.length :] + guess for sequence, cache, guess in zip(sequences, caches, guesses)]
            logits = lm.forward(second.loaded.model, caches, feeds)  # every row's: feeds are short (one token + guesses)
            passes += 1 + first_passes
            for row, row_logits, guess, sequence in zip(rows, logits, guesses, sequences):
                session, proposal = sessions[row], proposals[row]
                scored = row_logits[len(row_logits) - len(guess) - 1 :]  # [len(guess) + 1, V']: after sequence, then after each guess
                for step, step_logits in enumerate(scored):
                    token = draw(step_logits, work[row], len(proposal.tokens), proposal, second.max_support, second.head_ids,
                                 session.history(proposal.tokens), second.vocab_size, session.allowed())
                    session.drafted(token)
                    proposal.tokens.append(token)
                    if step == len(guess) or token != guess[step]:
                        break
                # the cache keeps the sequence and the guesses drawn alike; the last drawn token is fed next time
                session.state.cache.truncate(len(sequence) + step)

    def warm_up(self) -> None:
        self.first.warm_up()
        self.second.warm_up()
        self.weight_format = self.second.weight_format
        self.weight_format_reason = f"second stage: {self.second.weight_format_reason}"
        self.device = self.second.device
        session = DraftSession(ids=[0, 1, 2, 0, 1])
        self.start(session)
        self.propose([session], [ProposeWork("warm-up", 5, [], 3, sampling.GREEDY, [])])
