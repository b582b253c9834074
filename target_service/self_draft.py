"""A target that drafts for itself: its first L layers and an exit, on its own sessions' caches.

With `--self-draft`, the target service also serves the DraftService API, so an orchestrator's
`--draft` may point at the target itself. Proposing runs the target's first L decoder layers over
the session's pending token and each draft token in turn, writing those layers' keys and values
into the session's own cache past its committed length, and reads each draft token off an exit
after layer L: the target's final norm and head (untrained), or a trained exit layer
(`draft_service/drafters/early_exit.py`) with a cache of its own. The layer-L states of the fed
tokens are kept as the session's draft span.

The next Verify reuses the span (LayerSkip's cache reuse): for the longest prefix of its tokens
the span fed at the same positions, layers below L are not computed again; their cache entries
are already there, and layers L..N start from the kept layer-L states. Only the rest (the last
draft token, which was drawn but never fed) runs through every layer. Verification is otherwise
unchanged, so output stays exact; `tests/test_self_draft.py` checks that the verify's logits equal
a full forward's.

Runs on the lean path only (torch weight formats); a request that reads target features (feature
drafters) is refused on a self-drafting target.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from draft_service.drafters import early_exit
from draft_service.drafters.base import Drafter, DraftSession
from draft_service.drafters.model import draw
from specdec import lm, sampling
from specdec.errors import FailedPrecondition
from specdec.lean_llama import LeanLlama
from specdec.messages import Proposal, ProposeWork


@dataclass
class DraftSpan:
    """Tokens a self-draft fed through the first L layers from cache position `start`, and their
    layer-L states [len(tokens), H]."""

    start: int
    tokens: list[int] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)

    def states(self, count: int) -> torch.Tensor:
        return torch.cat(self.hidden)[:count]


def parse(spec: str) -> tuple[int, Path | None]:
    """`L` (the untrained exit after L layers) or a trained exit (`early-exit:L`, a directory)
    -> (L, the exit's directory or None)."""
    if spec.isdigit():
        return int(spec), None
    directory = early_exit.directory_of(spec)
    if directory is None:
        raise ValueError(f"--self-draft takes L or a trained early exit (early-exit:L or its directory), not {spec!r}")
    return early_exit.read_config(directory).layers, directory


class SelfDraft:
    """The target side: the lower and upper passes over a session's cache, and the exit."""

    def __init__(self, model: torch.nn.Module, layers: int, exit_directory: Path | None):
        count = lm.num_layers(model)
        if not 0 < layers < count:
            raise ValueError(f"--self-draft needs 0 < L < {count}, the target's layers")
        self.model, self.layers, self.exit_directory = model, layers, exit_directory
        self.exit: LeanLlama | None = None
        self.head_ids: torch.Tensor | None = None
        self.reused_positions = 0  # positions whose layers below L a Verify did not compute again
        self.verified_positions = 0

    def lean(self) -> LeanLlama:
        path = lm.lean_path(self.model)
        if path is None:
            raise ValueError(f"self-drafting runs on torch weight formats; this target runs {lm.weight_format(self.model)}")
        return path

    def build_exit(self) -> None:
        """The exit in the target's weight format: a model of 0 layers (the target's final norm and
        head) or of the trained exit layer, its norm and the target's head on its vocabulary."""
        config = copy.deepcopy(self.model.config)
        config.num_hidden_layers = 1 if self.exit_directory else 0
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[: config.num_hidden_layers]
        with torch.device("meta"):
            exit_model = LlamaForCausalLM(config)
        base = self.model.model
        exit_model.model.embed_tokens, exit_model.model.rotary_emb, exit_model.model.norm = base.embed_tokens, base.rotary_emb, base.norm
        head = self.model.get_output_embeddings()
        if self.exit_directory is not None:
            layer, norm, self.head_ids = early_exit.load_exit(self.exit_directory, self.model.config, 0)
            exit_model.model.layers = torch.nn.ModuleList([layer])
            exit_model.model.norm = copy.deepcopy(base.norm)
            exit_model.model.norm.weight.data = norm
            head = torch.nn.Linear(head.weight.shape[1], len(self.head_ids), bias=False)
            head.weight = torch.nn.Parameter(self.model.get_output_embeddings().weight[self.head_ids].clone(), requires_grad=False)
        else:
            exit_model.model.layers = torch.nn.ModuleList()
        exit_model.lm_head = head
        self.exit = LeanLlama(exit_model, self.lean().format)
        if self.exit_directory is None:  # the target's own head: share its converted weights rather than hold a second copy
            self.exit.head = self.lean().head

    def lower(self, caches: list[lm.SequenceCache], tokens: list[list[int]], starts: list[int]) -> list[torch.Tensor]:
        """Layers 0..L-1 over each row's tokens from its start: per row the layer-L states [n, H]."""
        lean = self.lean()
        lengths = [len(t) for t in tokens]
        x, _ = lean.run_layers(lean.embed(tokens), caches, lengths, starts, range(self.layers))
        return list(x.split(lengths))

    def verify_forward(self, caches: list[lm.SequenceCache], tokens: list[list[int]], spans: list[DraftSpan | None]):
        """`lm.forward(model, caches, tokens)` with each row's span reused: per row the logits
        [n, V] of every new position and the layer-L states [n, H] of the new positions."""
        lean = self.lean()
        starts = [c.length for c in caches]
        reused = [_reusable(span, start, row) for span, start, row in zip(spans, starts, tokens)]
        fresh_rows = [i for i, row in enumerate(tokens) if len(row) > reused[i]]
        fresh = self.lower([caches[i] for i in fresh_rows], [tokens[i][reused[i] :] for i in fresh_rows],
                           [starts[i] + reused[i] for i in fresh_rows]) if fresh_rows else []
        fresh_of = dict(zip(fresh_rows, fresh))
        states = []
        for i, span in enumerate(spans):
            parts = ([span.states(reused[i])] if reused[i] else []) + ([fresh_of[i]] if i in fresh_of else [])
            states.append(torch.cat(parts))
        lengths = [len(row) for row in tokens]
        x, _ = lean.run_layers(torch.cat(states), caches, lengths, starts, range(self.layers, len(lean.layers)))
        for cache, n in zip(caches, lengths):
            cache.length += n
        self.reused_positions += sum(reused)
        self.verified_positions += sum(lengths)
        return lean.logits(x, lengths), states

    def exit_logits(self, caches: list[lm.SequenceCache], states: list[torch.Tensor]) -> list[torch.Tensor]:
        """The exit over each row's new layer-L states: logits [V'] of the last."""
        lengths = [len(s) for s in states]
        x, _ = self.exit.run_layers(torch.cat(states), caches, lengths, [c.length for c in caches], range(len(self.exit.layers)))
        for cache, n in zip(caches, lengths):
            cache.length += n
        return [rows[-1] for rows in self.exit.logits(x, lengths, 1)]


def _reusable(span: DraftSpan | None, start: int, tokens: list[int]) -> int:
    """Positions of `tokens` (fed at `start`) whose layers below L the span already computed."""
    if span is None or span.start != start:
        return 0
    count = 0
    for fed, token in zip(span.tokens, tokens):
        if fed != token:
            break
        count += 1
    return count


class SelfDrafter(Drafter):
    """The draft side, over a target engine's sessions (same ids); proposals batched across sessions."""

    samples = True

    def __init__(self, engine, max_support: int = 64):
        self.engine = engine  # target_service.engine.TargetEngine, with engine.self_draft set
        self.self_draft: SelfDraft = engine.self_draft
        loaded = engine.loaded
        self.name = f"self-draft:{self.self_draft.layers}" + (f"+{self.self_draft.exit_directory.name}" if self.self_draft.exit_directory else "")
        self.tokenizer, self.eos_token_ids = loaded.tokenizer, loaded.eos_token_ids
        self.vocab_size, self.vocab_fingerprint = loaded.vocab_size, loaded.vocab_fingerprint
        self.max_support = max_support

    def start(self, session: DraftSession) -> None:
        session.state = lm.SequenceCache()  # the exit's

    def rollback(self, session: DraftSession, length: int) -> None:
        session.state.truncate(length)

    def state_bytes(self, session: DraftSession) -> int:
        return session.state.nbytes if session.state is not None else 0

    def _target_session(self, session: DraftSession):
        target = self.engine.sessions.get(session.session_id, "session_id")
        committed = target.cache.length
        if target.cache.length < len(target.ids) or len(session.ids) <= committed or session.ids[:committed] != target.ids[:committed]:
            raise FailedPrecondition(
                f"the target's session {session.session_id!r} is not the draft's sequence minus its last tokens", "session_id"
            )
        return target

    def propose(self, sessions: list[DraftSession], work: list[ProposeWork]) -> tuple[list[Proposal], int]:
        draft = self.self_draft
        targets = [self._target_session(s) for s in sessions]
        proposals = [Proposal([], None if w.sampling.deterministic else []) for w in work]
        feeds = []
        for session, target in zip(sessions, targets):
            target.span = DraftSpan(target.cache.length)
            session.state.truncate(target.cache.length)
            feeds.append(session.ids[target.cache.length :])
        passes = 0
        for step in range(max(w.num_speculative_tokens for w in work)):
            rows = [i for i, w in enumerate(work) if w.num_speculative_tokens > step]
            spans = [targets[i].span for i in rows]
            states = draft.lower([targets[i].cache for i in rows], [feeds[i] for i in rows], [s.start + len(s.tokens) for s in spans])
            exit_inputs = []
            for i, span, state in zip(rows, spans, states):
                span.tokens += feeds[i]
                span.hidden.append(state)
                exit_cache, committed = sessions[i].state, targets[i].cache.length
                behind = targets[i].layer_rows[exit_cache.length : committed] if exit_cache.length < committed else state[:0]
                exit_inputs.append(torch.cat([behind, state]))
            logits = draft.exit_logits([sessions[i].state for i in rows], exit_inputs)
            passes += 1
            for i, row_logits in zip(rows, logits):
                session = sessions[i]
                token = draw(row_logits, work[i], step, proposals[i], self.max_support, draft.head_ids,
                             session.history(proposals[i].tokens), self.vocab_size, session.allowed())
                session.drafted(token)
                proposals[i].tokens.append(token)
                feeds[i] = [token]
        return proposals, passes

    def warm_up(self) -> None:
        self.weight_format = lm.weight_format(self.engine.loaded.model)
        self.weight_format_reason = "the target's own"
        self.device = self.engine.loaded.placement
