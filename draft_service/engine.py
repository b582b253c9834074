"""The draft engine: sessions, validation and token bookkeeping around one `Drafter`.

No gRPC here. Per session it holds the sequence the drafter has seen, its own latest proposals
included. `prefix_len` in a Propose cuts that sequence back to what the target accepted (the
rollback) and `tokens` extends it (the recovered or bonus token); then the drafter proposes.
"""

from __future__ import annotations

import time

from draft_service.drafters.base import Drafter, DraftSession
from specdec import validation
from specdec.errors import FailedPrecondition, InvalidArgument, SpecdecError
from specdec.grammar import Grammar, GrammarCompiler, GrammarState
from specdec.messages import ModelInfo, Proposal, ProposeWork
from specdec.model_service.batching import admit_calls, per_call
from specdec.sessions import SessionLimits, SessionStore


MAX_TREE_NODES = 64  # a draft tree of more nodes costs more draft time than any verify could repay here


class DraftEngine:
    def __init__(self, drafter: Drafter, limits: SessionLimits = SessionLimits(), max_speculative_tokens: int = 16, max_context: int = 8192):
        self.drafter = drafter
        self.max_speculative_tokens = max_speculative_tokens
        self.max_context = max_context
        self.sessions: SessionStore[DraftSession] = SessionStore(limits, drafter.state_bytes)
        self._grammars: GrammarCompiler | None = None  # built at the first session with a grammar

    def info(self) -> ModelInfo:
        return ModelInfo(
            model=self.drafter.name,
            vocab_size=self.drafter.vocab_size,
            vocab_fingerprint=self.drafter.vocab_fingerprint,
            max_context=self.max_context,
            eos_token_ids=(),
            max_speculative_tokens=self.max_speculative_tokens,
            active_sessions=len(self.sessions),
            cache_bytes=self.sessions.total_bytes(),
            device=self.drafter.device,
            weight_format=self.drafter.weight_format,
            weight_format_reason=self.drafter.weight_format_reason,
            feature_layers=self.drafter.feature_layers,
        )

    def start_session(self, session_id: str, prompt: list[int], prompt_len: int = 0, grammar: Grammar | None = None) -> float:
        """Open a session on `prompt`, of which the first `prompt_len` tokens are the request's
        prompt (0: all; the rest was generated before the session started); seconds spent.
        With `grammar`, drafts follow it (drafters with a tokenizer)."""
        started = time.perf_counter()
        prompt = validation.token_ids(prompt, self.drafter.vocab_size, "prompt_token_ids")
        prompt_len = validation.prompt_len(prompt_len, len(prompt), "prompt_len")
        if len(prompt) >= self.max_context:
            raise InvalidArgument(f"prompt of {len(prompt)} tokens leaves no room in the context of {self.max_context}", "prompt_token_ids")
        self.sessions.check_budget(len(prompt) * self.drafter.bytes_per_token())
        grammar_state = self._grammar_state(grammar, prompt[prompt_len:])
        session = DraftSession(ids=prompt, prompt_len=prompt_len, grammar=grammar_state, session_id=session_id)
        self.sessions.add(session_id, session)
        self.drafter.start(session)
        return time.perf_counter() - started

    def _grammar_state(self, grammar: Grammar | None, output: list[int]) -> GrammarState | None:
        """A matcher of `grammar` past `output`; None when the drafter cannot follow grammars or
        the output does not match (drafting is then unconstrained: the target still decides)."""
        if grammar is None or (self._grammars is None and self.drafter.tokenizer is None):
            return None
        if self._grammars is None:
            self._grammars = GrammarCompiler.for_tokenizer(self.drafter.tokenizer, self.drafter.vocab_size, self.drafter.eos_token_ids)
        state = self._grammars.state(grammar)
        return state if state.sync(output) else None

    def end_session(self, session_id: str) -> bool:
        return self.sessions.remove(session_id)

    def propose(self, batch: list[ProposeWork]) -> tuple[list[Proposal], int]:
        """Proposals for one call's items and the forward passes spent; raise its error if any."""
        outcome = self.propose_calls([batch])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def propose_calls(self, calls: list[list[ProposeWork]]) -> list[tuple[list[Proposal], int] | SpecdecError]:
        """Propose for the items of every valid call at once (one drafter call, its forward passes
        shared); a call with an invalid item gets its error and takes no part."""
        outcomes, items = admit_calls(calls, self._checked_call)
        proposals, passes = [], 0
        if items:
            for work, session in items:
                self.drafter.rollback(session, work.prefix_len)
                session.ids = session.ids[: work.prefix_len] + work.tokens
                if session.grammar is not None and not session.grammar.sync(session.ids[session.prompt_len :]):
                    session.grammar = None
                if work.features is not None:
                    self.drafter.receive(session, work.features)
            proposals, passes = self.drafter.propose([s for _, s in items], [w for w, _ in items])
            for (_, session), proposal in zip(items, proposals):
                if proposal.parents is None:  # a tree's nodes stay out: the next round sends the accepted path
                    session.ids = session.ids + proposal.tokens
        return [o if isinstance(o, SpecdecError) else (o, passes) for o in per_call(outcomes, proposals)]

    def _checked_call(self, batch: list[ProposeWork]) -> list[DraftSession]:
        """The call's sessions, or its error."""
        if not batch:
            raise InvalidArgument("a Propose call needs at least one item", "items")
        validation.distinct_sessions([item.session_id for item in batch], "items")
        sessions = [self._checked(index, item) for index, item in enumerate(batch)]
        self.sessions.check_budget(sum(len(i.tokens) + i.num_speculative_tokens for i in batch) * self.drafter.bytes_per_token())
        return sessions

    def _checked(self, index: int, item: ProposeWork) -> DraftSession:
        prefix = f"items[{index}]."
        session = self.sessions.get(item.session_id, prefix + "session_id")
        validation.token_ids(item.tokens, self.drafter.vocab_size, prefix + "tokens")
        validation.sampling_token_ids(item.sampling, self.drafter.vocab_size, prefix + "sampling.")
        validation.num_speculative_tokens(item.num_speculative_tokens, self.max_speculative_tokens, prefix + "num_speculative_tokens", 1)
        if item.prefix_len > len(session.ids):
            raise FailedPrecondition(
                f"session {item.session_id!r} holds {len(session.ids)} tokens, cannot keep {item.prefix_len}", prefix + "prefix_len"
            )
        if item.prefix_len + len(item.tokens) + item.num_speculative_tokens > self.max_context:
            raise InvalidArgument(f"the sequence would exceed the context of {self.max_context}", prefix + "num_speculative_tokens")
        if item.tree is not None:
            validation.tree_shape(item.tree, item.num_speculative_tokens, MAX_TREE_NODES, prefix + "tree_branching")
        elif self.drafter.samples and not item.sampling.deterministic:
            validation.uniforms(item.uniforms, item.num_speculative_tokens, prefix + "uniforms")
        if item.features is not None:
            self._check_features(item, session, prefix + "features")
        return session

    def _check_features(self, item: ProposeWork, session: DraftSession, field: str) -> None:
        features = item.features
        if not self.drafter.feature_layers:
            raise InvalidArgument(f"the drafter {self.drafter.name!r} reads no target features", field)
        if features.rows.shape[1] != self.drafter.feature_width:
            raise InvalidArgument(f"rows of {features.rows.shape[1]} values; this drafter reads {self.drafter.feature_width}", field + ".width")
        held = min(self.drafter.features_held(session), item.prefix_len)
        if features.start != held:
            raise FailedPrecondition(f"session {item.session_id!r} holds features of {held} positions, these start at {features.start}", field + ".start")
        if features.end > item.prefix_len + len(item.tokens) - 1:
            raise InvalidArgument("features reach the sequence's last token, which the target has not scored", field + ".rows")
