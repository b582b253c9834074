"""One generation request from start to end: validation, tokenization and chat templates, the
request's random generator, both sessions, EOS, stop strings and max_new_tokens, streamed deltas,
statistics, and the release of both sessions however the request ends (cancellation included).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch

from orchestrator.backends import DraftBackend, TargetBackend, is_draft_failure
from orchestrator.policy import AdaptiveK, CostCurve, KResolver, KSettings, LoadEstimates, Policy
from orchestrator.replicas import ReplicaSet, is_replica_failure
from orchestrator.speculation import MAX_TARGET_REBUILDS, Speculation, TargetLost, remaining, speculate
from orchestrator.stats import GenerationStats
from orchestrator.text import TextStream
from orchestrator.tree_policy import tree_choice
from specdec import validation
from specdec.chat import chat_token_ids
from specdec.errors import FailedPrecondition, InvalidArgument, OutputIncomplete, SpecdecError
from specdec.grammar import Grammar, GrammarCompiler
from specdec.messages import Logprobs, ModelInfo
from specdec.sampling import SamplingParams

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
MAX_STOPS = 16
MAX_STOP_TOKEN_IDS = 64


def encode_prompt(tokenizer, prompt: str, messages: tuple[tuple[str, str], ...]) -> tuple[list[int], str]:
    """Token ids of a raw prompt or of chat messages rendered with the tokenizer's chat template
    (with the generation prompt), and the name of the request field they came from."""
    if prompt and messages:
        raise InvalidArgument("set either prompt or messages, not both", "prompt")
    if not messages:
        return (tokenizer(prompt).input_ids if prompt else []), "prompt"
    for index, (role, _) in enumerate(messages):
        if role not in ROLES:
            raise InvalidArgument(f"role must be one of {', '.join(ROLES)}, got {role!r}", f"messages[{index}].role")
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidArgument("the target's tokenizer has no chat template; send a prompt", "messages")
    return chat_token_ids(tokenizer, [{"role": role, "content": content} for role, content in messages]), "messages"


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()
    max_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    num_speculative_tokens: int | None = None
    logprobs: int | None = None  # None: none; n: each output token's and the n most probable
    warped_logprobs: bool = False  # from the warped distribution instead of the raw one
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    stop_token_ids: tuple[int, ...] = ()  # generation stops at these too (finish "stop"); not output
    ignore_eos: bool = False  # EOS tokens are output like any other
    seed_stable: bool = False  # draws keyed by (seed, position): the same output whatever K, drafter or batch
    min_tokens: int = 0  # EOS and stop_token_ids are forbidden before this many output tokens
    include_stop_str_in_output: bool = False  # the text ends after the stop string, not before
    skip_special_tokens: bool = True  # special tokens decode to nothing
    grammar: Grammar | None = None  # structured output: what the output must match


@dataclass
class GenerationEvent:
    """A streamed delta; the last event has finish_reason and stats."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "length", "stop" or "eos"
    stats: GenerationStats | None = None
    logprobs: Logprobs | None = None  # of token_ids, when the request asks for them

    @staticmethod
    def joined(events: list["GenerationEvent"]) -> "GenerationEvent":
        """A whole generation's events as one (Generate's answer)."""
        last = events[-1]
        logprobs = None if last.logprobs is None else Logprobs.joined([e.logprobs for e in events if e.logprobs is not None])
        token_ids = [t for e in events for t in e.token_ids]
        return GenerationEvent("".join(e.text for e in events), token_ids, last.finish_reason, last.stats, logprobs)


@dataclass
class GenerationEngine:
    """Runs requests against one target and, optionally, one draft (`draft_info` its ModelInfo)."""

    tokenizer: object
    target: TargetBackend
    target_info: ModelInfo
    draft: DraftBackend | None = None
    draft_info: ModelInfo | None = None
    k_settings: KSettings = field(default_factory=KSettings)
    max_new_tokens: int = 4096  # the most a request may ask for
    pipeline_drafts: bool = False  # propose each round while the target verifies the one before
    draft_tree: str = ""  # --draft-tree: draft trees instead of chains, a shape or "auto" (tree_policy.py)

    def __post_init__(self):
        self.load = LoadEstimates(CostCurve(self.target_info.forward_cost))
        self.trees = tree_choice(self.draft_tree, self.load, self.target_info.max_speculative_tokens)
        self.k_resolver = KResolver(self.k_settings, self.target_info, self.draft_info)
        self._grammars: GrammarCompiler | None = None  # built at the first request with a grammar

    def check_grammar(self, grammar: Grammar) -> None:
        """INVALID_ARGUMENT naming the grammar's field unless it compiles for the target's
        vocabulary (the model services compile it again, each for its own) and the target has an
        end-of-sequence token to end a complete output with."""
        if self._grammars is None:
            self._grammars = GrammarCompiler.for_tokenizer(self.tokenizer, self.target_info.vocab_size, self.target_info.eos_token_ids)
        self._grammars.compile(grammar)
        if not self.target_info.eos_token_ids:
            raise InvalidArgument("the target has no end-of-sequence token to end a structured output with", "grammar")

    def tokenize(self, request: GenerationRequest) -> list[int]:
        ids, field_name = encode_prompt(self.tokenizer, request.prompt, request.messages)
        if not ids:
            raise InvalidArgument("the prompt is empty", field_name)
        context = self.target_info.max_context
        if len(ids) >= context:
            raise InvalidArgument(f"the prompt has {len(ids)} tokens; the target's context holds {context}", field_name)
        if len(ids) + request.max_new_tokens > context:
            raise InvalidArgument(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({request.max_new_tokens}) exceed the context of {context}",
                "max_new_tokens",
            )
        return ids

    def validate(self, request: GenerationRequest, seed: int | None = None) -> tuple[SamplingParams, Policy]:
        """The request's sampling parameters (seed-stable ones keyed by `seed`) and K policy."""
        if not 1 <= request.max_new_tokens <= self.max_new_tokens:
            raise InvalidArgument(
                f"max_new_tokens must be in [1, {self.max_new_tokens}], got {request.max_new_tokens}", "max_new_tokens"
            )
        if request.seed is not None and not 0 <= request.seed < 1 << 64:
            raise InvalidArgument(f"seed must be in [0, 2^64), got {request.seed}", "seed")
        validation.logprobs(request.logprobs, "logprobs")
        if len(request.stop) > MAX_STOPS or any(not s for s in request.stop):
            raise InvalidArgument(f"at most {MAX_STOPS} stop strings, none of them empty", "stop")
        if len(request.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidArgument(f"at most {MAX_STOP_TOKEN_IDS} stop token ids, got {len(request.stop_token_ids)}", "stop_token_ids")
        validation.token_ids(request.stop_token_ids, self.target_info.vocab_size, "stop_token_ids", allow_empty=True)
        if request.min_tokens > request.max_new_tokens:
            raise InvalidArgument(f"min_tokens ({request.min_tokens}) exceeds max_new_tokens ({request.max_new_tokens})", "min_tokens")
        ends = set(request.stop_token_ids) | (set() if request.ignore_eos else set(self.target_info.eos_token_ids))
        sampling = validation.sampling_params(
            request.temperature, request.top_k, request.top_p, vocab_size=self.target_info.vocab_size, min_p=request.min_p,
            repetition_penalty=request.repetition_penalty, presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty, logit_bias=dict(request.logit_bias),
            position_seed=seed if request.seed_stable else None,
            min_tokens=request.min_tokens, end_token_ids=tuple(sorted(ends)) if request.min_tokens else (),
        )
        # a seeded request samples the same uniforms only with the same K every round; seed-stable draws need none
        seeded_uniforms = request.seed is not None and not sampling.deterministic
        policy = self.k_resolver.policy(request.num_speculative_tokens, seeded_uniforms, self.load)
        if request.grammar is not None:
            if request.min_tokens:
                raise InvalidArgument("a grammar decides where the output ends: min_tokens cannot go with it", "min_tokens")
            if request.ignore_eos:
                raise InvalidArgument("a grammar ends the output with an end-of-sequence token: ignore_eos cannot go with it", "ignore_eos")
            self.check_grammar(request.grammar)
        return sampling, policy

    async def stream(self, request: GenerationRequest, deadline: float | None = None) -> AsyncIterator[GenerationEvent]:
        started = time.monotonic()
        seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(8), "little")
        sampling, policy = self.validate(request, seed)
        prompt = self.tokenize(request)
        spec = Speculation(
            session_id=uuid.uuid4().hex,
            prompt=prompt,
            sampling=sampling,
            policy=policy,
            max_new_tokens=request.max_new_tokens,
            rng=torch.Generator().manual_seed(seed),
            deadline=deadline,
            load=self.load,
            feature_layers=self.draft_info.feature_layers if self.draft_info is not None and policy.max_speculative_tokens > 0 else (),
            logprobs=request.logprobs,
            warped_logprobs=request.warped_logprobs,
            pipeline=self.pipeline_drafts,
            grammar=request.grammar,
            tree=self.trees,
            max_tree_nodes=self.target_info.max_speculative_tokens,
        )
        adaptive = isinstance(policy, AdaptiveK)
        stats = GenerationStats(
            num_speculative_tokens=0 if adaptive else policy.num_speculative_tokens, adaptive_k=adaptive, prompt_tokens=len(prompt)
        )
        draft = self.draft if policy.max_speculative_tokens > 0 else None
        text = TextStream(self.tokenizer, list(request.stop), request.include_stop_str_in_output, request.skip_special_tokens)
        eos = set() if request.ignore_eos else set(self.target_info.eos_token_ids)
        stop_ids = set(request.stop_token_ids)
        try:
            draft = await self._start_sessions(spec, draft, stats)
            finish, last_ids, last_logprobs = "length", [], None
            async with contextlib.aclosing(_with_output(speculate(spec, self.target, draft, stats), text)) as rounds:
                async for tokens, logprobs in rounds:
                    released_ids = []
                    for token in tokens:
                        if token in eos:
                            finish = "eos"
                            break
                        if token in stop_ids:
                            finish = "stop"
                            break
                        released_ids.append(token)
                        if text.add(token):
                            finish = "stop"
                            break
                    stats.generated_tokens += len(released_ids)
                    if released_ids and not stats.time_to_first_token_seconds:
                        stats.time_to_first_token_seconds = time.monotonic() - started
                    released_logprobs = None if logprobs is None else logprobs[: len(released_ids)]
                    if finish != "length":
                        last_ids, last_logprobs = released_ids, released_logprobs
                        break
                    yield GenerationEvent(text.release(), released_ids, logprobs=released_logprobs)
            stats.total_seconds = time.monotonic() - started
            log.info("generation %s", json.dumps(stats.summary(spec.session_id, len(prompt), finish)))
            if request.logprobs is not None and last_logprobs is None:
                last_logprobs = Logprobs([], [], [])
            yield GenerationEvent(text.release(final=True), last_ids, finish, stats, last_logprobs)
        finally:
            # a draft session moving to another replica (rebuilds) may end between the two: the set forgets it
            await _shielded(self._end_sessions(spec.session_id, draft if spec.draft_started or stats.draft_rebuilds else None))

    async def _start_sessions(self, spec: Speculation, draft: DraftBackend | None, stats: GenerationStats) -> DraftBackend | None:
        """Prefill both sessions concurrently (the draft's only if the first round drafts);
        returns the draft, or None when it failed to start (the request then runs target-only)."""
        timeout = remaining(spec.deadline)
        calls = [self._start_target(spec, timeout)]
        if draft is not None and spec.policy.first_k() > 0:
            spec.draft_started = True
            calls.append(draft.start_session(spec.session_id, spec.prompt, timeout, grammar=spec.grammar))
        results = await asyncio.gather(*calls, return_exceptions=True)
        if isinstance(results[0], BaseException):
            if len(results) > 1 and not isinstance(results[1], BaseException):
                await _shielded(self._end_draft(spec.session_id, draft))
            raise results[0]
        stats.add_target_call(results[0])
        if len(results) == 1:
            return draft
        if isinstance(results[1], SpecdecError) and is_draft_failure(results[1]):
            log.warning("session %s: draft did not start (%s); running target-only", spec.session_id, results[1].message)
            return None
        if isinstance(results[1], BaseException):
            raise results[1]
        stats.add_draft_call(results[1])
        return draft

    async def _start_target(self, spec: Speculation, timeout: float | None):
        """Start the target session; when its replica fails, on another one (nothing has been
        generated yet: the request moves freely)."""
        for attempt in range(MAX_TARGET_REBUILDS + 1):
            try:
                return await self.target.start_session(spec.session_id, spec.prompt, timeout, grammar=spec.grammar, feature_layers=spec.feature_layers)
            except SpecdecError as error:
                movable = isinstance(self.target, ReplicaSet) and bool(self.target.healthy())
                if attempt == MAX_TARGET_REBUILDS or not is_replica_failure(error) or not movable:
                    raise
                log.warning("session %s: target replica failed at the start (%s); trying another", spec.session_id, error.message)

    async def _end_sessions(self, session_id: str, draft: DraftBackend | None) -> None:
        await asyncio.gather(self._end_target(session_id), self._end_draft(session_id, draft))

    async def _end_target(self, session_id: str) -> None:
        try:
            await self.target.end_session(session_id, timeout=10.0)
        except SpecdecError as error:
            log.warning("session %s: target did not end it (%s); its TTL will", session_id, error.message)

    async def _end_draft(self, session_id: str, draft: DraftBackend | None) -> None:
        if draft is None:
            return
        try:
            await draft.end_session(session_id, timeout=10.0)
        except SpecdecError as error:
            log.warning("session %s: draft did not end it (%s); its TTL will", session_id, error.message)


async def _with_output(rounds: AsyncIterator, text: TextStream) -> AsyncIterator:
    """The rounds; a lost target ends them with OutputIncomplete carrying the output so far."""
    try:
        async with contextlib.aclosing(rounds):
            async for round_output in rounds:
                yield round_output
    except TargetLost as error:
        raise OutputIncomplete(f"{error.message}; {len(text.token_ids)} tokens were generated", text.token_ids, text.text) from error


async def _shielded(coroutine) -> None:
    """Run cleanup to completion even when the request's task is being cancelled."""
    task = asyncio.ensure_future(coroutine)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


def check_compatible(target: ModelInfo, draft: ModelInfo | None, tokenizer_fingerprint: str) -> None:
    """FAILED_PRECONDITION unless the orchestrator's tokenizer, the target and the draft share one
    vocabulary (drafters that copy ids from the sequence, like n-grams, fit any)."""
    if target.vocab_fingerprint and tokenizer_fingerprint != target.vocab_fingerprint:
        raise FailedPrecondition("the orchestrator's tokenizer differs from the target's vocabulary", "tokenizer")
    if draft is not None and draft.vocab_fingerprint and draft.vocab_fingerprint != target.vocab_fingerprint:
        raise FailedPrecondition(
            f"the draft's vocabulary ({draft.vocab_size} tokens, {draft.vocab_fingerprint[:12]}) differs from the "
            f"target's ({target.vocab_size} tokens, {target.vocab_fingerprint[:12]}); speculative decoding needs one vocabulary",
            "draft",
        )
