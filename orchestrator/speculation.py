"""The speculation loop at the level of token ids: draft K tokens, verify them, commit the accepted
prefix plus the recovered or bonus token, repeat. Text, stop strings and streaming live above it
(generation.py); the math lives in the target (specdec/sampling.py).

Every round has one shape. The target holds `committed` tokens in its cache; `pending` is the one
token it has not seen (the prompt's last token, then each round's recovered or bonus token). The
draft proposes from committed + pending; the target scores pending + drafts in one forward pass.
K = 0 is the same loop with no draft call: plain target-only decoding through the same services.
K is the request's policy's choice per round (orchestrator/policy.py); after rounds at K = 0 the
draft lags behind, and the next Propose sends every token it has not seen.

A feature drafter (its ModelInfo names `feature_layers`) also needs the target's features up to
the position before the pending token: the target returns them with every verdict, and the next
Propose carries every row the draft has not received. The first round has none yet (the prompt's
come back with the first verdict), so it runs at K = 0.

With draft trees (`Speculation.tree`, docs/trees.md) a round's K is the tree's depth: the draft
answers with nodes and their parents, the target verifies them all and answers with the accepted
path, and the round commits that path plus the next token. The draft keeps no tree node, so the
next Propose sends the path with the new token.

A round never drafts past `max_new_tokens`: with r tokens left it drafts at most r - 1, so the
accepted tokens plus the one the target adds always fit.

Pipelined drafting (`Speculation.pipeline`): while the target verifies a round's K drafts, the
draft already proposes the next round from the likeliest outcome, every draft accepted and the
bonus token equal to the draft's own next token: a Propose of K' + 1 tokens after the last draft,
whose first token is that guess. When the verdict bears the guess out, the next round verifies
the other K' at once; otherwise they are dropped and the round proposes as usual. Only the
target's verdict decides what is committed, so the output is the same either way (the proposal is
still a draw from the draft's distribution given the committed sequence, with the same q). The
next Propose is only sent once the one ahead has answered, so the draft's session sees its calls
in order, and each call's `prefix_len` cuts it back to what the target holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

import torch

from orchestrator.backends import DraftBackend, TargetBackend, is_draft_failure
from orchestrator.policy import LoadEstimates, Policy
from orchestrator.replicas import ReplicaSet, is_replica_failure
from orchestrator.stats import GenerationStats
from orchestrator.tree_policy import TreeChoice
from specdec.errors import DeadlineExceeded, SpecdecError, Unavailable
from specdec.grammar import Grammar
from specdec.messages import Features, Logprobs, Proposal, ProposeWork, VerifyWork
from specdec.sampling import SamplingParams

log = logging.getLogger(__name__)

MAX_TARGET_REBUILDS = 3  # per request: then it ends with UNAVAILABLE (TargetLost)
MAX_DRAFT_REBUILDS = 2  # per request: then it goes on target-only
REBUILD_BACKOFF_S = (0.0, 0.25, 1.0)  # before each target rebuild: a lone replica may be restarting


class TargetLost(Unavailable):
    """Every rebuild of the request's target session failed; generation.py adds the output so far."""


@dataclass
class Speculation:
    """One generation: its inputs, fixed for its life, and whether the draft's session exists."""

    session_id: str
    prompt: list[int]
    sampling: SamplingParams
    policy: Policy  # the number of draft tokens of each round
    max_new_tokens: int
    rng: torch.Generator  # the request's randomness: every uniform number the services use
    deadline: float | None = None  # time.monotonic() by which the request must end
    load: LoadEstimates | None = None  # the orchestrator's shared estimates, updated by every round
    # Whether the draft's session was started (or its start was sent): a request whose policy
    # starts at K = 0 starts it at its first round that drafts, with the sequence so far.
    draft_started: bool = False
    feature_layers: tuple[int, ...] = ()  # the target layers the draft reads; () for token drafters
    logprobs: int | None = None  # VerifyWork.logprobs of every round
    warped_logprobs: bool = False
    pipeline: bool = False  # propose the next round while the target verifies this one
    grammar: Grammar | None = None  # structured output, enforced by both services
    # Each round's draft tree (tree_policy.py), of at most max_tree_nodes nodes (the target's
    # limit); None: chains. Not with grammars, features or pipelining (those rounds stay chains).
    tree: TreeChoice | None = None
    max_tree_nodes: int = 16

    @property
    def trees(self) -> bool:
        return self.tree is not None and self.grammar is None and not self.feature_layers and not self.pipeline


@dataclass
class _Ahead:
    """A Propose sent while the target verified a round, for the round after it."""

    task: asyncio.Future  # -> (Proposal, CallCost)
    committed: int  # what the target holds if the round accepts every draft
    num_speculative_tokens: int  # the next round's K (the guessed bonus token comes first)


def remaining(deadline: float | None) -> float | None:
    """Seconds left before the deadline, as a timeout for the next upstream call."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("the request's deadline passed")
    return left


def _uniforms(spec: Speculation, count: int) -> list[float]:
    if spec.sampling.deterministic:
        return []
    return torch.rand(count, generator=spec.rng, dtype=torch.float32).tolist()


async def speculate(
    spec: Speculation, target: TargetBackend, draft: DraftBackend | None, stats: GenerationStats
) -> AsyncIterator[tuple[list[int], Logprobs | None]]:
    """Yield the tokens committed by each round, with their logprobs when spec asks for them, until
    max_new_tokens; the caller stops early on EOS or a stop string. Sessions must already be
    started on both services."""
    sequence = list(spec.prompt)  # the prompt and every committed token; the last one is pending
    committed = len(sequence) - 1  # tokens in the target's cache
    drafted_to = committed  # tokens in the draft's cache: rounds at K = 0 leave the draft behind
    left = spec.max_new_tokens
    unsent: list[Features] = []  # target features the draft has not received
    features_end = 0  # positions whose features came back from the target
    ahead: _Ahead | None = None  # the next round's Propose, sent during this round's Verify
    mark = time.perf_counter()  # the end of the previous round: what follows until the next is ours
    try:
        while left > 0:
            calls_s = 0.0  # this round's calls, from the first conversion to the last
            if ahead is not None:  # K was chosen when the Propose went ahead
                num_speculative_tokens = min(ahead.num_speculative_tokens, left - 1) if draft is not None else 0
            else:
                num_speculative_tokens = min(spec.policy.next_k(), left - 1) if draft is not None else 0
            if spec.feature_layers and features_end < committed:
                num_speculative_tokens = 0
            shape, draft_round_s = None, 0.0
            if spec.trees and num_speculative_tokens > 0 and ahead is None:
                depth, shape = spec.tree.choose(num_speculative_tokens)
                num_speculative_tokens = min(depth, left - 1)
            proposal_tokens, distributions, drafted, parents = [], None, False, None
            if ahead is not None:
                waited = time.perf_counter()
                proposal = await _settled(ahead, spec, stats)
                calls_s += time.perf_counter() - waited
                guessed = proposal is not None and ahead.committed == committed and proposal.tokens[:1] == sequence[-1:]
                if guessed and num_speculative_tokens > 0:
                    proposal_tokens = proposal.tokens[1 : 1 + num_speculative_tokens]
                    distributions, drafted = proposal.distributions[1:] if proposal.distributions else None, True
                    stats.pipelined_rounds += 1
                ahead = None
            if num_speculative_tokens > 0 and not drafted:
                try:
                    if not spec.draft_started:
                        spec.draft_started = True
                        stats.add_draft_call(await draft.start_session(spec.session_id, sequence, remaining(spec.deadline), len(spec.prompt), spec.grammar))
                        drafted_to = committed
                    work = ProposeWork(
                        spec.session_id, drafted_to, sequence[drafted_to:], num_speculative_tokens, spec.sampling,
                        _uniforms(spec, num_speculative_tokens) if shape is None else [], Features.joined(unsent), shape,
                    )
                    proposal, cost = await draft.propose(work, remaining(spec.deadline))
                    unsent = []
                    calls_s += cost.wall_s + cost.conversion_s
                    stats.add_draft_call(cost)
                    draft_round_s = cost.wall_s
                    if spec.load is not None and shape is None:  # per token of a chain
                        spec.load.observe_draft(cost.wall_s, num_speculative_tokens)
                    if proposal.parents is not None:  # a tree: any prefix of its nodes is one (parents come first)
                        parents = proposal.parents[: spec.max_tree_nodes]
                        proposal_tokens, distributions, drafted = proposal.tokens[: len(parents)], proposal.distributions, True
                    else:
                        proposal_tokens, distributions, drafted = proposal.tokens[:num_speculative_tokens], proposal.distributions, True
                except SpecdecError as error:
                    if not is_draft_failure(error):
                        raise
                    if is_replica_failure(error) and isinstance(draft, ReplicaSet) and draft.healthy() and stats.draft_rebuilds < MAX_DRAFT_REBUILDS:
                        log.warning("session %s: draft replica failed (%s); starting it on another", spec.session_id, error.message)
                        stats.draft_rebuilds += 1
                        spec.draft_started = False  # the next round that drafts starts it again, from the sequence so far
                    else:
                        log.warning("session %s: draft failed (%s); continuing target-only", spec.session_id, error.message)
                        draft = None
            verify = VerifyWork(
                spec.session_id,
                committed,
                sequence[committed:],
                proposal_tokens,
                distributions[: len(proposal_tokens)] if distributions else None,
                spec.sampling,
                _uniforms(spec, len(proposal_tokens) + 1),
                spec.logprobs,
                spec.warped_logprobs,
                parents,
            )
            if spec.pipeline and proposal_tokens and draft is not None and not spec.feature_layers:
                ahead = _propose_ahead(spec, draft, sequence, proposal_tokens, left)
            verdict, cost = await _verify(spec, target, verify, sequence, stats)
            calls_s += cost.wall_s + cost.conversion_s
            if verdict.features is not None and draft is not None and verdict.features.end > features_end:
                # a rebuilt target session returns every position's features again: keep the new ones
                unsent.append(verdict.features.after(features_end))
                features_end = verdict.features.end
            stats.add_target_call(cost)
            stats.add_round(len(proposal_tokens), verdict.accepted)
            if parents is None:  # a tree's acceptance is not a chain's: the K policy learns from chains only
                spec.policy.observe(len(proposal_tokens), verdict.accepted)
            if spec.load is not None:
                spec.load.observe_verify(cost.compute_s, cost.batch_size, cost.batch_tokens)
            path = verdict.path if verdict.path is not None else range(verdict.accepted)
            new_tokens = [proposal_tokens[i] for i in path] + [verdict.next_token]
            if spec.trees and proposal_tokens:
                spec.tree.observe(shape if parents is not None else None, len(new_tokens), draft_round_s)
            if drafted and parents is not None:  # the draft holds the sequence up to the pending token, no tree node
                drafted_to = len(sequence)
            committed += 1 + verdict.accepted
            if drafted and parents is None:  # the draft holds the pending token and its own accepted drafts
                drafted_to = committed
            sequence += new_tokens
            left -= len(new_tokens)
            now = time.perf_counter()
            stats.orchestrator_seconds += max(now - mark - calls_s, 0.0)
            mark = now  # the caller's work on these tokens (text, stops, streaming) counts in the next round
            yield new_tokens, verdict.logprobs
    finally:
        if ahead is not None:  # the generation ended with a Propose in flight: nobody needs it
            ahead.task.cancel()
            with contextlib.suppress(BaseException):
                await ahead.task


async def _verify(spec: Speculation, target: TargetBackend, work: VerifyWork, sequence: list[int], stats: GenerationStats):
    """The round's Verify; when the target session's replica fails, the session is started again
    (on another replica if there is one) from the prompt and every committed token, and the same
    work, uniforms included, is verified there: the output is the same as without the failure."""
    for rebuilds in range(MAX_TARGET_REBUILDS + 1):
        try:
            if rebuilds:
                await asyncio.sleep(REBUILD_BACKOFF_S[rebuilds - 1])
                stats.target_rebuilds += 1
                stats.add_target_call(await target.start_session(
                    spec.session_id, sequence, remaining(spec.deadline), len(spec.prompt), spec.grammar, spec.feature_layers
                ))
            return await target.verify(work, remaining(spec.deadline))
        except SpecdecError as error:
            if not is_replica_failure(error):
                raise
            log.warning("session %s: target failed (%s: %s)", spec.session_id, error.code_name, error.message)
            failure = error
    raise TargetLost(f"the target failed and {MAX_TARGET_REBUILDS} attempts to start the session again failed: {failure.message}")


def _propose_ahead(spec: Speculation, draft: DraftBackend, sequence: list[int], drafts: list[int], left: int) -> _Ahead | None:
    """Send the next round's Propose now, assuming every one of `drafts` is accepted: the draft
    holds `sequence` and the drafts (it made them), so it is cut back before the last draft, given
    it again and asked for the guessed bonus token and the next round's drafts after it."""
    num_speculative_tokens = min(spec.policy.next_k(), left - len(drafts) - 2)  # left after that round, less its bonus
    if num_speculative_tokens <= 0:
        return None
    work = ProposeWork(
        spec.session_id, len(sequence) + len(drafts) - 1, drafts[-1:], num_speculative_tokens + 1, spec.sampling,
        _uniforms(spec, num_speculative_tokens + 1), None,
    )
    task = asyncio.ensure_future(draft.propose(work, remaining(spec.deadline)))
    return _Ahead(task, len(sequence) + len(drafts), num_speculative_tokens)


async def _settled(ahead: _Ahead, spec: Speculation, stats: GenerationStats) -> Proposal | None:
    """The Propose sent ahead, once answered; None when it failed (the round then proposes anew,
    and a draft that is really gone fails there)."""
    try:
        proposal, cost = await ahead.task
    except SpecdecError as error:
        if not is_draft_failure(error):
            raise
        log.info("session %s: draft proposed ahead in vain (%s)", spec.session_id, error.message)
        return None
    stats.add_draft_call(cost)
    if spec.load is not None:
        spec.load.observe_draft(cost.wall_s, ahead.num_speculative_tokens + 1)
    return proposal
