"""Drafting with a small causal LM that shares the target's tokenizer.

Per session the drafter keeps a KV cache of a prefix of the session's ids. Proposing K tokens
feeds the ids the cache lacks (usually the previous round's recovered or bonus token; also the
last draft token when every draft was accepted, since it was sampled but never fed), then K - 1
drafted tokens, one forward pass each, batched across sessions.

When sampling, each draft token is drawn from the warped draft distribution truncated to its
`max_support` most probable tokens and renormalized. Speculative sampling is exact for any
draft distribution, as long as q is the one the token was drawn from, so the truncation costs a
little acceptance and buys a small message: K x max_support ids and probabilities per round
instead of K x V floats.

A draft directory may hold a reduced draft vocabulary (`DRAFT_VOCAB_FILE`, written by
`python -m distill`): the output head then scores only those tokens (FR-Spec), which
on a tiny model costs less than its layers, and head rows are mapped back to token ids. Exactness
is unaffected: a draft may propose from any support.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from draft_service.drafters import tree
from draft_service.drafters.base import Drafter, DraftSession
from specdec import lm, sampling, trees
from specdec.messages import Proposal, ProposeWork
from specdec.models import LoadedModel, resolve

DRAFT_VOCAB_FILE = "draft_vocab.safetensors"


def draft_vocabulary_of(model: str) -> torch.Tensor | None:
    """The sorted token ids a local draft directory's head is restricted to, if it has a file."""
    path = Path(resolve(model)) / DRAFT_VOCAB_FILE
    return load_file(str(path))["token_ids"].long() if path.is_file() else None


def restrict_head(model: torch.nn.Module, token_ids: torch.Tensor) -> None:
    """Replace the output head by one scoring only `token_ids` (rows of the current head)."""
    full = model.get_output_embeddings().weight  # [V, H]
    head = torch.nn.Linear(full.shape[1], len(token_ids), bias=False, device=full.device, dtype=full.dtype)
    head.weight = torch.nn.Parameter(full[token_ids.to(full.device)].clone(), requires_grad=False)  # [V', H]
    model.set_output_embeddings(head)


def draw(
    logits: torch.Tensor, work: ProposeWork, step: int, proposal: Proposal, max_support: int, head_ids: torch.Tensor | None,
    history: sampling.History, vocab_size: int, allowed: torch.Tensor | None = None,
) -> int:
    """One draft token from [V'] logits over head rows (`head_ids` maps rows to token ids; None:
    rows are ids): the argmax when greedy; seed-stable, the Gumbel-max choice with the noise of its
    position (the target's, so they agree whenever the distributions do); else sampled with the
    step's uniform from the warped distribution cut to `max_support` tokens, which is recorded in
    `proposal` as q. Logit bias and
    penalties, when the work asks for them, apply as on the target, after `history`; they act on
    token ids, so a reduced head's rows are first spread over the `vocab_size` ids (-inf elsewhere).
    `allowed` ([V] bool over token ids): what a grammar allows; a head with none of it drafts
    unmasked (the target rejects such drafts)."""
    if work.sampling.processes_logits:
        if head_ids is not None:
            logits = torch.full((vocab_size,), float("-inf")).index_copy_(0, head_ids, logits.float())
            head_ids = None
        logits = sampling.process_logits(logits[None], work.sampling, history)[0]
    if allowed is not None:
        rows_allowed = allowed if head_ids is None else allowed[head_ids]
        if bool((rows_allowed & (logits > float("-inf"))).any()):
            logits = logits.masked_fill(~rows_allowed, float("-inf"))
    token_ids = (lambda rows: rows) if head_ids is None else (lambda rows: head_ids[rows])  # noqa: E731
    if work.sampling.greedy:
        return int(token_ids(sampling.argmax(logits)))
    probs = sampling.warp(logits, work.sampling)  # [V']
    if work.sampling.position_keyed:
        position = len(history.prompt) + len(history.output)
        noise = sampling.position_noise(work.sampling.position_seed, [position], vocab_size)[0]  # [V]
        rows = torch.arange(len(probs)) if head_ids is None else head_ids
        return int(token_ids(sampling.argmax(sampling.gumbel_scores(probs, noise[rows]))))
    support_rows, support_probs = sampling.truncate_to_support(probs[None], max_support)  # [1, S] each
    support_ids = token_ids(support_rows[0])  # [S]
    chosen = sampling.sample(support_probs, torch.tensor([work.uniforms[step]]))  # [1]
    proposal.distributions.append((support_ids.to(torch.int32), support_probs[0]))
    return int(support_ids[chosen[0]])


class ModelDrafter(Drafter):
    samples = True

    def __init__(self, loaded: LoadedModel, max_support: int = 64, head_ids: torch.Tensor | None = None):
        """`head_ids`: the draft vocabulary to restrict `loaded.model`'s head to, in place (None:
        the full vocabulary)."""
        self.loaded = loaded
        self.head_ids = head_ids
        if head_ids is not None:
            restrict_head(loaded.model, head_ids)
        self.name = loaded.name
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids = loaded.eos_token_ids
        self.vocab_size = loaded.vocab_size
        self.vocab_fingerprint = loaded.vocab_fingerprint
        self.max_support = max_support
        self.device = loaded.placement
        self._bytes_per_token = lm.kv_bytes_per_token(loaded.model)

    def start(self, session: DraftSession) -> None:
        session.state = lm.SequenceCache()
        if len(session.ids) > 1:
            lm.forward(self.loaded.model, [session.state], [session.ids[:-1]], logits_for_last=1)

    def rollback(self, session: DraftSession, length: int) -> None:
        session.state.truncate(length)

    def state_bytes(self, session: DraftSession) -> int:
        return session.state.nbytes if session.state is not None else 0

    def bytes_per_token(self) -> int:
        return self._bytes_per_token

    def propose(self, sessions: list[DraftSession], work: list[ProposeWork]) -> tuple[list[Proposal], int]:
        """Chains for the works without a tree, batched; then a tree for each work with one."""
        chains = [i for i, w in enumerate(work) if w.tree is None]
        proposals: dict[int, Proposal] = {}
        passes = 0
        if chains:
            made, passes = self._propose_chains([sessions[i] for i in chains], [work[i] for i in chains])
            proposals.update(zip(chains, made))
        for i in (i for i, w in enumerate(work) if w.tree is not None):
            proposals[i], spent = self._propose_tree(sessions[i], work[i])
            passes += spent
        return [proposals[i] for i in range(len(work))], passes

    def _propose_tree(self, session: DraftSession, work: ProposeWork) -> tuple[Proposal, int]:
        """A tree of the draft's likeliest tokens (draft_service/drafters/tree.py): one pass over
        the tokens the cache lacks, then one per depth over the nodes to expand and their
        ancestors, which the cache forgets again (it holds the session's ids only)."""
        cache, model = session.state, self.loaded.model
        length = len(session.ids)
        root = lm.forward(model, [cache], [session.ids[cache.length :]], logits_for_last=1)[0][-1]
        widest = max(work.tree.branching)
        passes = 1

        def expand(grown: tree.Tree, nodes: list[int]):
            nonlocal passes
            tokens, parents, order = tree.pruned(grown, nodes)
            logits = lm.forward(model, [cache], [tokens], logits_for_last=len(nodes), parents=[parents])[0]
            cache.truncate(length)
            passes += 1
            return [self._candidates(row, work, session, [grown.tokens[i] for i in trees.path_to(grown.parents, node)], widest)
                    for row, node in zip(logits, nodes)]

        grown = tree.grow(work.tree, work.num_speculative_tokens, self._candidates(root, work, session, [], widest), expand)
        return Proposal(grown.tokens, None, grown.parents), passes

    def _candidates(self, logits: torch.Tensor, work: ProposeWork, session: DraftSession, path: list[int], width: int):
        """A node's likeliest children (token id, log-probability) from its [V'] logits: processed
        (bias, penalties after the node's path) and warped as the work samples; greedy ranks by
        the draft's own softmax."""
        head_ids = self.head_ids
        if work.sampling.processes_logits:
            if head_ids is not None:
                logits = torch.full((self.vocab_size,), float("-inf")).index_copy_(0, head_ids, logits.float())
                head_ids = None
            logits = sampling.process_logits(logits[None], work.sampling, session.history(path))[0]
        log_probs = torch.log_softmax(logits.float(), -1) if work.sampling.greedy else sampling.warp(logits, work.sampling).log()
        return tree.likeliest(log_probs, width, (lambda rows: rows) if head_ids is None else (lambda rows: head_ids[rows]))

    def _propose_chains(self, sessions: list[DraftSession], work: list[ProposeWork]) -> tuple[list[Proposal], int]:
        proposals = [Proposal([], None if w.sampling.deterministic else []) for w in work]
        feed = [s.ids[s.state.length :] for s in sessions]  # tokens each cache still lacks
        passes = 0
        for step in range(max(w.num_speculative_tokens for w in work)):
            rows = [i for i, w in enumerate(work) if w.num_speculative_tokens > step]
            logits = lm.forward(self.loaded.model, [sessions[i].state for i in rows], [feed[i] for i in rows], logits_for_last=1)
            passes += 1
            for row, row_logits in zip(rows, logits):
                session = sessions[row]
                token = draw(row_logits[-1], work[row], step, proposals[row], self.max_support, self.head_ids,
                             session.history(proposals[row].tokens), self.vocab_size, session.allowed())
                session.drafted(token)
                proposals[row].tokens.append(token)
                feed[row] = [token]
        return proposals, passes

    def warm_up(self) -> None:
        """The weight format (timed when "auto"), then one proposal, so the first real one does
        not pay for lazy setup."""
        choice = lm.choose_format(self.loaded)
        self.weight_format, self.weight_format_reason = choice.format, choice.reason
        self.device = self.loaded.placement
        self._bytes_per_token = lm.kv_bytes_per_token(self.loaded.model)
        session = DraftSession(ids=[0, 1, 2])
        self.start(session)
        self.propose([session], [ProposeWork('warm-up', 2, [2], 2, sampling.GREEDY, [])])
