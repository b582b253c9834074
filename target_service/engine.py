"""The target engine: the large model, its per-session KV caches, and batched verification.

No gRPC here: the servicer converts protobuf into `VerifyWork` and calls `verify`. The acceptance
test runs here, where the target's distribution p lives, so that p ([K+1, V] floats per sequence)
never crosses the network; what comes in is the draft tokens plus, when sampling, the draft's
sparse q and K+1 uniform numbers; what goes out is two integers per sequence (and, when the item asks,
the committed tokens' logprobs: rows 0..accepted of the scored K+1).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from specdec import lm, sampling, trees, validation
from specdec.errors import FailedPrecondition, InvalidArgument, SpecdecError
from specdec.grammar import Grammar, GrammarCompiler, GrammarState, apply_mask
from specdec.lean_llama import PER_QUERY_MAX, supports_lean_path
from specdec.messages import Features, Logprobs, ModelInfo, VerifyWork
from specdec.model_service.batching import admit_calls, per_call
from specdec.models import LoadedModel
from specdec.sampling import Verdict
from specdec.sessions import SessionLimits, SessionStore

# Tokens per forward pass at which warm-up measures the cost curve: one sequence's verify of K + 1
# tokens up to K = 15, then batches of such rows.
COST_CURVE_TOKENS = (*range(1, 17), 32, 64)
ROW_TOKENS = 16


@dataclass
class TargetSession:
    """Token ids held in the cache, and the cache."""

    ids: list[int]
    prompt_len: int  # tokens of the request's prompt; the rest of ids is output (for penalties)
    grammar: GrammarState | None = None  # structured output: the matcher of the session's output
    cache: lm.SequenceCache = field(default_factory=lm.SequenceCache)
    chunk: int = 0  # prefill chunk size in tokens; 0: the whole prompt at once
    feature_layers: tuple[int, ...] = ()  # layers whose outputs go back with every Verify
    unsent: list[torch.Tensor] = field(default_factory=list)  # feature rows held, not yet returned
    sent: int = 0  # positions whose features were returned
    # self-drafting targets (target_service/self_draft.py): the layer-L states of the cached
    # positions [cache.length, H] (the trained exit's input), and the latest draft's span
    layer_rows: torch.Tensor | None = None
    span: object = None

    def keep_layer_rows(self, rows: torch.Tensor) -> None:
        """Append the layer-L states of newly fed positions, keep those of cached positions only,
        and forget the draft span (whatever it fed is now computed or rolled back)."""
        held = rows if self.layer_rows is None else torch.cat([self.layer_rows, rows])
        self.layer_rows, self.span = held[: self.cache.length], None

    @property
    def nbytes(self) -> int:
        rows = self.layer_rows.numel() * self.layer_rows.element_size() if self.layer_rows is not None else 0
        return self.cache.nbytes + rows


class TargetEngine:
    def __init__(self, loaded: LoadedModel, limits: SessionLimits = SessionLimits(), max_speculative_tokens: int = 16, self_draft=None):
        """`self_draft`: a target_service.self_draft.SelfDraft when the target drafts for itself."""
        self.loaded = loaded
        self.max_speculative_tokens = max_speculative_tokens
        self.self_draft = self_draft
        self.sessions: SessionStore[TargetSession] = SessionStore(limits, lambda s: s.nbytes)
        self.vocab_fingerprint = loaded.vocab_fingerprint
        self._bytes_per_token = lm.kv_bytes_per_token(loaded.model)
        self.forward_cost: tuple[tuple[int, float], ...] = ()
        self.format_choice = None  # weights.FormatChoice, resolved at warm-up
        self._grammars: GrammarCompiler | None = None  # built at the first session with a grammar

    @property
    def vocab_size(self) -> int:
        return self.loaded.vocab_size

    def info(self) -> ModelInfo:
        return ModelInfo(
            model=self.loaded.name,
            vocab_size=self.vocab_size,
            vocab_fingerprint=self.vocab_fingerprint,
            max_context=self.loaded.max_context,
            eos_token_ids=self.loaded.eos_token_ids,
            max_speculative_tokens=self.max_speculative_tokens,
            active_sessions=len(self.sessions),
            cache_bytes=self.sessions.total_bytes(),
            device=self.loaded.placement,
            forward_cost=self.forward_cost,
            weight_format=lm.weight_format(self.loaded.model),
            weight_format_reason=self.format_choice.reason if self.format_choice else "",
        )

    def warm_up(self) -> None:
        """The weight format (timed when "auto"), one prefill and one verify, so the first real
        request does not pay for lazy setup; then the forward cost curve."""
        self.format_choice = lm.choose_format(self.loaded, lean_only=self.self_draft is not None)
        if self.self_draft is not None:
            self.self_draft.build_exit()
        self._bytes_per_token = lm.kv_bytes_per_token(self.loaded.model)
        self.start_session("warm-up", [0, 1, 2])
        self.verify([VerifyWork("warm-up", 2, [2], [3], None, sampling.GREEDY, [])])
        self.end_session("warm-up")
        self.forward_cost = self.measure_forward_cost()

    def measure_forward_cost(self, sizes=COST_CURVE_TOKENS, context: int = 64, repeats: int = 5) -> tuple[tuple[int, float], ...]:
        """Seconds of one forward pass scoring n tokens, for each n in `sizes`, in rows of up to
        ROW_TOKENS tokens over `context` tokens each. The fastest of `repeats` passes, made
        non-decreasing in n: the service measures this while other processes may be starting on
        the same machine, and interference only ever adds time."""
        rows = (max(sizes) + ROW_TOKENS - 1) // ROW_TOKENS
        caches = [lm.SequenceCache() for _ in range(rows)]
        lm.forward(self.loaded.model, caches, [[row % self.vocab_size] * context for row in range(rows)], logits_for_last=1)
        curve, slowest = [], 0.0
        for n in sizes:
            lengths = [ROW_TOKENS] * (n // ROW_TOKENS) + ([n % ROW_TOKENS] if n % ROW_TOKENS else [])
            fastest = float("inf")
            for _ in range(repeats):
                started = time.perf_counter()
                lm.forward(self.loaded.model, caches[: len(lengths)], [[1] * length for length in lengths])
                fastest = min(fastest, time.perf_counter() - started)
                for cache in caches:
                    cache.truncate(context)
            slowest = max(slowest, fastest)
            curve.append((n, slowest))
        return tuple(curve)

    def start_session(
        self, session_id: str, prompt: list[int], feature_layers: tuple[int, ...] = (), prompt_len: int = 0, grammar: Grammar | None = None
    ) -> float:
        """Open a session and prefill its whole prompt; seconds spent."""
        started = time.perf_counter()
        self.begin_session(session_id, prompt, feature_layers=feature_layers, prompt_len=prompt_len, grammar=grammar)
        while self.prefill(session_id):
            pass
        return time.perf_counter() - started

    def begin_session(
        self, session_id: str, prompt: list[int], prefill_chunk_tokens: int = 0, feature_layers: tuple[int, ...] = (), prompt_len: int = 0,
        grammar: Grammar | None = None,
    ) -> int:
        """Open a session whose cache `prefill` then fills, `prefill_chunk_tokens` at a time (0:
        all at once); returns the number of tokens to prefill. The service prefills in chunks so
        that other sessions' rounds run between them. With `feature_layers`, the session keeps
        those layers' outputs for a feature drafter and returns them with every verdict.
        `prompt_len`: how many of `prompt` are the request's prompt (0: all); `grammar`: what
        the output must match."""
        prompt = validation.token_ids(prompt, self.vocab_size, "prompt_token_ids")
        prompt_len = validation.prompt_len(prompt_len, len(prompt), "prompt_len")
        self._check_feature_layers(feature_layers)
        if len(prompt) >= self.loaded.max_context:
            raise InvalidArgument(
                f"prompt of {len(prompt)} tokens leaves no room in the context of {self.loaded.max_context}", "prompt_token_ids"
            )
        self.sessions.check_budget(len(prompt) * self._bytes_per_token)
        # the cache holds all but the last prompt token: that one is the first round's input
        state = self._grammar_state(grammar, prompt[prompt_len:]) if grammar is not None else None
        session = TargetSession(ids=prompt[:-1], prompt_len=prompt_len, grammar=state, chunk=prefill_chunk_tokens, feature_layers=tuple(feature_layers))
        self.sessions.add(session_id, session)
        return len(session.ids)

    def _grammar_state(self, grammar: Grammar, output: list[int]) -> GrammarState:
        """A matcher of `grammar` that has consumed `output` (compiled for the model's tokenizer)."""
        if self._grammars is None:
            if self.loaded.tokenizer is None:
                raise InvalidArgument("this target has no tokenizer to compile a grammar for", "grammar")
            self._grammars = GrammarCompiler.for_tokenizer(self.loaded.tokenizer, self.vocab_size, self.loaded.eos_token_ids)
        state = self._grammars.state(grammar)
        if not state.sync(output):
            raise InvalidArgument("the output tokens after prompt_len do not match the grammar", "prompt_token_ids")
        return state

    def _check_feature_layers(self, layers: tuple[int, ...]) -> None:
        count = lm.num_layers(self.loaded.model)
        if layers and not supports_lean_path(self.loaded.model):
            raise InvalidArgument("this target's architecture cannot return features (Llama architectures can)", "feature_layers")
        if layers and self.self_draft is not None:
            raise InvalidArgument("this target drafts for itself (--self-draft) and returns no features", "feature_layers")
        if len(set(layers)) != len(layers) or any(not -count <= layer < count for layer in layers):
            raise InvalidArgument(f"feature_layers must be distinct decoder layers in [-{count}, {count})", "feature_layers")

    def prefill(self, session_id: str) -> int:
        """Feed the next chunk of the session's prompt to its cache; tokens still to prefill.

        The output a session starts with (a session rebuilt on this replica after another failed)
        goes in rows of at most PER_QUERY_MAX tokens, as rounds feed it, never with the prompt:
        a format whose long rows take another path (the native formats) then computes the same
        cache, and the rebuilt session the same logits, as the lost one."""
        session = self.sessions.get(session_id)
        done, prompt_end = session.cache.length, session.prompt_len - 1  # the prompt's last token is the first round's input
        if done < prompt_end:
            end = prompt_end if not session.chunk else min(prompt_end, done + session.chunk)
        else:
            end = min(len(session.ids), done + PER_QUERY_MAX)
        if end > done:
            layers = (self.self_draft.layers - 1,) if self.self_draft is not None else session.feature_layers
            output = lm.forward(self.loaded.model, [session.cache], [session.ids[done:end]], logits_for_last=1, features=layers)
            if session.feature_layers:
                session.unsent.append(output[1][0])
            if self.self_draft is not None:
                session.keep_layer_rows(output[1][0])
        return len(session.ids) - end

    def end_session(self, session_id: str) -> bool:
        return self.sessions.remove(session_id)

    def verify(self, batch: list[VerifyWork]) -> list[Verdict]:
        """Verify one call's items in one forward pass; raise its error if it has one."""
        outcome = self.verify_calls([batch])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def verify_calls(self, calls: list[list[VerifyWork]]) -> list[list[Verdict] | SpecdecError]:
        """Score the items of every valid call in one forward pass and roll each cache back to its
        accepted prefix. A call with an invalid item gets its error and takes no part; the others
        are not affected by it."""
        outcomes, items = admit_calls(calls, self._checked_call)
        verdicts = []
        if items and self.self_draft is not None:
            sessions = [s for _, s in items]
            logits, states = self.self_draft.verify_forward([s.cache for s in sessions], [w.tokens + w.draft_tokens for w, _ in items],
                                                            [s.span for s in sessions])
            verdicts = [self._commit(work, session, rows) for (work, session), rows in zip(items, logits)]
            for session, rows in zip(sessions, states):
                session.keep_layer_rows(rows)
        elif items:
            layers = tuple(dict.fromkeys(layer for _, s in items for layer in s.feature_layers))  # every layer any session reads
            trees_of = [_row_tree(w) for w, _ in items]
            output = lm.forward(
                self.loaded.model, [s.cache for _, s in items], [w.tokens + w.draft_tokens for w, _ in items], logits_for_last=None, features=layers,
                parents=trees_of if any(t is not None for t in trees_of) else None,
            )
            logits, features = output if layers else (output, [None] * len(items))  # per item [len(tokens) + K, V], [.., H x layers]
            verdicts = [self._commit(work, session, rows) for (work, session), rows in zip(items, logits)]
            verdicts = [self._with_features(v, w, s, f, layers) for v, (w, s), f in zip(verdicts, items, features)]
        return per_call(outcomes, verdicts)

    def _with_features(self, verdict: Verdict, work: VerifyWork, session: TargetSession, rows: torch.Tensor | None, layers: tuple[int, ...]) -> Verdict:
        """The verdict with the session's unsent features up to its last committed position."""
        if not session.feature_layers:
            return verdict
        width = rows.shape[1] // len(layers)
        columns = torch.cat([torch.arange(width) + layers.index(layer) * width for layer in session.feature_layers])
        session.unsent.append(rows[_committed_rows(work, verdict)][:, columns])
        features = Features(session.sent, torch.cat(session.unsent))
        session.unsent, session.sent = [], features.end
        return replace(verdict, features=features)

    def _checked_call(self, batch: list[VerifyWork]) -> list[TargetSession]:
        """The call's sessions, or its error."""
        if not batch:
            raise InvalidArgument("a Verify call needs at least one item", "items")
        validation.distinct_sessions([work.session_id for work in batch], "items")
        sessions = [self._checked(index, work) for index, work in enumerate(batch)]
        new_tokens = sum(len(w.tokens) + len(w.draft_tokens) for w in batch)
        self.sessions.check_budget(new_tokens * self._bytes_per_token)
        return sessions

    def _commit(self, work: VerifyWork, session: TargetSession, logits: torch.Tensor) -> Verdict:
        k = len(work.draft_tokens)
        scored = logits[-(k + 1) :]  # [K+1, V]: predictions for each draft and the bonus (a tree: the root's, then each node's)
        processed = scored
        if work.sampling.processes_logits:
            sequence = session.ids + work.tokens
            history = sampling.History(sequence[: session.prompt_len], sequence[session.prompt_len :])
            if work.draft_parents is None:
                processed = sampling.process_logits(scored, work.sampling, history, work.draft_tokens)
            else:  # each node's row follows its own path
                paths = [[]] + [[work.draft_tokens[i] for i in trees.path_to(work.draft_parents, node)] for node in range(k)]
                processed = torch.cat([sampling.process_logits(row[None], work.sampling, sampling.History(history.prompt, [*history.output, *path]))
                                       for row, path in zip(scored, paths)])
        if session.grammar is not None:
            processed = apply_mask(processed, session.grammar.masks_along(work.draft_tokens))
        verdict = self._decide(work, processed, len(session.ids) + len(work.tokens))
        path = verdict.path if verdict.path is not None else tuple(range(verdict.accepted))
        if work.logprobs is not None:
            committed = [work.draft_tokens[i] for i in path] + [verdict.next_token]
            rows = (processed if work.warped_logprobs else scored)[[0, *(1 + i for i in path)]]
            verdict = replace(verdict, logprobs=_logprobs(rows, committed, work))
        session.ids = session.ids + work.tokens + [work.draft_tokens[i] for i in path]
        if work.draft_parents is None:
            session.cache.truncate(len(session.ids))
        else:
            session.cache.keep_path(work.prefix_len, _committed_rows(work, verdict))
        return verdict


    def _decide(self, work: VerifyWork, scored: torch.Tensor, first_position: int) -> Verdict:
        """The verdict on [K+1, V] processed logits whose row 0 draws the token at `first_position`."""
        if work.draft_parents is not None:
            return self._decide_tree(work, scored, first_position)
        drafts = torch.tensor([work.draft_tokens], dtype=torch.long)  # [1, K]
        if work.sampling.greedy:
            return sampling.greedy_verify(scored.unsqueeze(0), drafts)[0]
        p = sampling.warp(scored, work.sampling)  # [K+1, V]
        if work.sampling.position_keyed:  # each row's token is its Gumbel-max choice: accept the drafts that equal it
            noise = sampling.position_noise(work.sampling.position_seed, range(first_position, first_position + len(p)), p.shape[-1])
            return sampling.greedy_verify(sampling.gumbel_scores(p, noise).unsqueeze(0), drafts)[0]
        p = p.unsqueeze(0)  # [1, K+1, V]
        q = None if work.draft_probs is None else self._dense_q(work).unsqueeze(0)  # [1, K, V]
        return sampling.rejection_sample(p, drafts, q, torch.tensor([work.uniforms]))[0]

    def _decide_tree(self, work: VerifyWork, scored: torch.Tensor, first_position: int) -> Verdict:
        """The verdict on a tree's [n+1, V] processed logits (row 0 the root's, at first_position)."""
        tokens, parents = work.draft_tokens, work.draft_parents
        if work.sampling.greedy:
            outcome = trees.greedy_tree_verify(scored, tokens, parents)
        else:
            p = sampling.warp(scored, work.sampling)  # [n+1, V]
            if work.sampling.position_keyed:  # row i draws the token at its node's depth
                positions = [first_position] + [first_position + depth for depth in trees.depths(parents)]
                noise = sampling.position_noise(work.sampling.position_seed, positions, p.shape[-1])
                outcome = trees.greedy_tree_verify(sampling.gumbel_scores(p, noise), tokens, parents)
            else:
                q = None if work.draft_probs is None else self._dense_q(work)
                outcome = trees.tree_rejection_sample(p, tokens, parents, q, torch.tensor(work.uniforms))
        return Verdict(len(outcome.path), outcome.next_token, path=outcome.path)

    def _dense_q(self, work: VerifyWork) -> torch.Tensor:
        """The drafts' sparse q as [K, V] rows."""
        return torch.stack([sampling.densify(ids[None], probs[None], self.vocab_size)[0] for ids, probs in work.draft_probs])

    def _check_tree(self, work: VerifyWork, session: TargetSession, prefix: str) -> None:
        problem = trees.check_parents(work.draft_parents, work.draft_tokens)
        if problem is not None:
            raise InvalidArgument(f"draft_parents {problem}", prefix + "draft_parents")
        if session.grammar is not None:
            raise InvalidArgument("draft trees are not verified under a grammar: send a chain", prefix + "draft_parents")
        if self.self_draft is not None:
            raise InvalidArgument("this target drafts for itself (--self-draft) and verifies chains only", prefix + "draft_parents")

    def _checked(self, index: int, work: VerifyWork) -> TargetSession:
        prefix = f"items[{index}]."
        session = self.sessions.get(work.session_id, prefix + "session_id")
        validation.logprobs(work.logprobs, prefix + "logprobs")
        validation.sampling_token_ids(work.sampling, self.vocab_size, prefix + "sampling.")
        validation.token_ids(work.tokens, self.vocab_size, prefix + "tokens")
        validation.token_ids(work.draft_tokens, self.vocab_size, prefix + "draft_tokens", allow_empty=True)
        k = validation.num_speculative_tokens(len(work.draft_tokens), self.max_speculative_tokens, prefix + "draft_tokens")
        if session.cache.length < len(session.ids):
            raise FailedPrecondition(f"session {work.session_id!r} is still prefilling its prompt", prefix + "session_id")
        if work.prefix_len != len(session.ids):
            raise FailedPrecondition(
                f"session {work.session_id!r} holds {len(session.ids)} tokens, the item says {work.prefix_len}",
                prefix + "prefix_len",
            )
        if work.draft_parents is not None:
            self._check_tree(work, session, prefix)
        if len(session.ids) + len(work.tokens) + k > self.loaded.max_context:
            raise InvalidArgument(f"the sequence would exceed the context of {self.loaded.max_context}", prefix + "tokens")
        if session.grammar is not None and not session.grammar.sync((session.ids + work.tokens)[session.prompt_len :]):
            raise InvalidArgument("the session's grammar forbids these tokens", prefix + "tokens")
        if not work.sampling.deterministic:
            validation.uniforms(work.uniforms, k + 1, prefix + "uniforms")
            if work.draft_probs is not None:
                validation.sparse_distributions(work.draft_probs, work.draft_tokens, self.vocab_size, prefix + "draft_probs")
        return session


def _row_tree(work: VerifyWork) -> list[int] | None:
    """The parents of a Verify row's tokens for lm.forward: `tokens` a chain, the tree's roots
    under the last of them; None for a chain of drafts."""
    if work.draft_parents is None:
        return None
    m = len(work.tokens)
    return [*range(-1, m - 1), *(m - 1 if parent < 0 else m + parent for parent in work.draft_parents)]


def _committed_rows(work: VerifyWork, verdict: Verdict) -> list[int]:
    """The row's positions (0: its first token) that stay: `tokens`, then the accepted drafts."""
    path = verdict.path if verdict.path is not None else range(verdict.accepted)
    return [*range(len(work.tokens)), *(len(work.tokens) + i for i in path)]


def _logprobs(rows: torch.Tensor, tokens: list[int], work: VerifyWork) -> Logprobs:
    """The committed tokens' log-probabilities at their positions (rows [n, V] of logits, processed
    when warped) and the work.logprobs most probable tokens of each: raw (log_softmax) or warped
    as sampled."""
    if work.warped_logprobs:
        values = sampling.warp(rows, work.sampling).log()
    else:
        values = torch.log_softmax(rows.float(), dim=-1)
    top = torch.topk(values, work.logprobs, dim=-1)  # sorted, most probable first
    chosen = values.gather(1, torch.tensor(tokens, device=values.device).unsqueeze(1)).squeeze(1)
    return Logprobs(chosen.tolist(), top.indices.tolist(), top.values.tolist())
