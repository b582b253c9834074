"""The drafter interface, and the per-session state the draft engine keeps for every drafter."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from specdec.grammar import GrammarState
from specdec.messages import Features, Proposal, ProposeWork
from specdec.sampling import History


@dataclass
class DraftSession:
    """The sequence as the drafter knows it, its own latest proposals included; `state` is the
    drafter's own (a KV cache for model drafters, nothing for n-grams)."""

    ids: list[int]
    prompt_len: int = 0  # tokens of ids that are the request's prompt (penalties count the output's)
    state: object = None
    grammar: GrammarState | None = None  # structured output: the matcher of ids[prompt_len:] and the drafts
    session_id: str = ""  # the id the orchestrator gave it (a self-drafting target's session has the same)

    def history(self, drafted: list[int]) -> History:
        """The sequence before the next draft token, the session's `drafted` ones included."""
        return History(self.ids[: self.prompt_len], self.ids[self.prompt_len :] + drafted)

    def allowed(self) -> torch.Tensor | None:
        """The tokens the session's grammar allows next, [V] bool; None without a grammar."""
        return self.grammar.mask() if self.grammar is not None else None

    def drafted(self, token: int) -> None:
        """Move the grammar past a drafted token (drafts after an end of sequence do not move it).
        A token it forbids (drawn by a head that holds none it allows) ends the session's masking:
        such drafts are rejected, never wrong."""
        if self.grammar is not None and not self.grammar.ended and not self.grammar.advance(token):
            self.grammar = None


class Drafter(ABC):
    """Proposes draft tokens for several sessions at once.

    The engine owns the sessions and the token bookkeeping: before `propose`, every session's `ids`
    ends with the tokens not yet seen by the drafter; after it, the engine appends the proposals.
    A drafter whose state lags behind (the last draft token of an all-accepted round was never fed
    to a model) catches up from `ids`.
    """

    name: str = "drafter"
    #: Size of the vocabulary the drafter's token ids come from; 0 for drafters that copy ids
    #: from the sequence and so work with any target.
    vocab_size: int = 0
    vocab_fingerprint: str = ""
    #: Whether proposals can be sampled (model drafters) or are always deterministic (n-grams).
    samples: bool = False
    device: str = "cpu"
    weight_format: str = ""  # of a model drafter's forward passes, and why (ModelInfo)
    weight_format_reason: str = ""
    #: Feature drafters: the target layers they read (ModelInfo.feature_layers) and the values per
    #: feature row; empty and 0 for drafters of tokens alone.
    feature_layers: tuple[int, ...] = ()
    feature_width: int = 0
    #: The tokenizer of the drafter's vocabulary, to follow a request's grammar; None: grammars
    #: are ignored (n-grams: their drafts are checked by the target like any other).
    tokenizer: object = None
    eos_token_ids: tuple[int, ...] = ()  # what ends an output the grammar completed

    def start(self, session: DraftSession) -> None:
        """Prepare the drafter's state for a new session (e.g. prefill all tokens but the last)."""

    def rollback(self, session: DraftSession, length: int) -> None:
        """Forget everything after the first `length` tokens of the session."""

    def features_held(self, session: DraftSession) -> int:
        """Feature drafters: positions whose target features the session holds (0, 1, ...)."""
        return 0

    def receive(self, session: DraftSession, features: Features) -> None:
        """Feature drafters: keep the target's features of positions features_held(session) on
        (the engine checks the start and the width)."""

    def state_bytes(self, session: DraftSession) -> int:
        return 0

    def bytes_per_token(self) -> int:
        return 0

    @abstractmethod
    def propose(self, sessions: list[DraftSession], work: list[ProposeWork]) -> tuple[list[Proposal], int]:
        """Proposals, one per session, and the number of model forward passes spent."""

    def warm_up(self) -> None:
        """Run once before the service reports SERVING."""
