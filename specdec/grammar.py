"""Structured output: a request's grammar (a JSON schema, any JSON object, a regular expression, an
EBNF or Lark grammar) compiled for one vocabulary, and a session's matcher kept in step with the
session's output tokens. No gRPC, no models.

Both services mask with it: the target its p at every verified position (row j after drafts 0..j-1,
as with the penalties), the draft its q at every drafted position, so drafts stay useful and a
draft token the grammar forbids (an n-gram's, say) has p = 0 and is simply rejected. The matcher
follows the session's tokens through rollbacks (`GrammarState.sync`), so both services roll it back
with their caches.

The engine is xgrammar (chosen over llguidance and outlines-core on this CPU: masks in a few
microseconds, unlimited rollback, a rejected token leaves the matcher usable; docs/api.md). JSON
is generated without free whitespace (", " and ": " separators, as json.dumps writes it): a model
may otherwise emit whitespace for ever, which the grammar cannot stop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from specdec.errors import InvalidArgument

KINDS = ("json_schema", "json_object", "regex", "ebnf", "lark")
MAX_ROLLBACK_TOKENS = 64  # more than any round rolls back: K <= 16 drafts plus the pending token


@dataclass(frozen=True)
class Grammar:
    """What the output must match (Grammar in common.proto): `kind` one of KINDS; `source` the
    schema's JSON text, the regular expression or the grammar ("" for json_object)."""

    kind: str
    source: str = ""


class GrammarCompiler:
    """Compiles grammars for one vocabulary (xgrammar caches what it compiled)."""

    def __init__(self, vocabulary: Sequence[str], stop_token_ids: Sequence[int], byte_level: bool = True):
        """`vocabulary`: the string of each token id as the tokenizer stores it ("" for special
        tokens, which the grammar never allows); `stop_token_ids`: what ends a complete output."""
        import xgrammar  # imported on first use: most services never see a grammar

        self._xgrammar = xgrammar
        self.vocab_size = len(vocabulary)
        vocab_type = xgrammar.VocabType.BYTE_LEVEL if byte_level else xgrammar.VocabType.RAW
        info = xgrammar.TokenizerInfo(list(vocabulary), vocab_type, vocab_size=self.vocab_size, stop_token_ids=list(stop_token_ids),
                                      add_prefix_space=False)
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=1)  # a service owns its cores: no thread pool

    @classmethod
    def for_tokenizer(cls, tokenizer, vocab_size: int, stop_token_ids: Sequence[int]) -> "GrammarCompiler":
        """The compiler of a Hugging Face byte-level BPE tokenizer; ids up to the model's
        `vocab_size` (beyond the tokenizer's, never allowed)."""
        vocabulary = [""] * vocab_size
        for token, index in tokenizer.get_vocab().items():
            if index < vocab_size:
                vocabulary[index] = token
        for index in tokenizer.all_special_ids:
            if index < vocab_size:
                vocabulary[index] = ""
        return cls(vocabulary, stop_token_ids)

    def compile(self, grammar: Grammar, field_name: str = "grammar"):
        """The compiled grammar; INVALID_ARGUMENT naming `field_name`.kind when it does not compile."""
        if grammar.kind not in KINDS:
            raise InvalidArgument(f"unknown grammar kind {grammar.kind!r}; one of {', '.join(KINDS)}", field_name)
        where = f"{field_name}.{grammar.kind}"
        try:
            if grammar.kind == "json_schema":
                json.loads(grammar.source)  # xgrammar's message for broken JSON is obscure
                return self._compiler.compile_json_schema(grammar.source, any_whitespace=False)
            if grammar.kind == "json_object":
                return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if grammar.kind == "regex":
                return self._compiler.compile_regex(grammar.source)
            if grammar.kind == "ebnf":
                return self._compiler.compile_grammar(grammar.source)
            return self._compiler.compile_lark(grammar.source)
        except (RuntimeError, ValueError, TypeError) as error:
            raise InvalidArgument(f"the {grammar.kind} does not compile: {str(error).strip()[:300]}", where) from None

    def state(self, grammar: Grammar, field_name: str = "grammar") -> "GrammarState":
        return GrammarState(self._xgrammar.GrammarMatcher(self.compile(grammar, field_name), max_rollback_tokens=MAX_ROLLBACK_TOKENS),
                            self.vocab_size, self._xgrammar)


@dataclass
class GrammarState:
    """A session's matcher and the output tokens it has consumed."""

    matcher: object
    vocab_size: int
    xgrammar: object
    consumed: list[int] = field(default_factory=list)

    def __post_init__(self):
        self._bitmask = self.xgrammar.allocate_token_bitmask(1, self.vocab_size)

    def sync(self, output: Sequence[int]) -> bool:
        """Roll back and advance so that the matcher has consumed exactly `output`; False (and the
        matcher at the longest allowed prefix) when the grammar forbids one of its tokens."""
        keep = 0
        while keep < min(len(self.consumed), len(output)) and self.consumed[keep] == output[keep]:
            keep += 1
        surplus = len(self.consumed) - keep
        if surplus > MAX_ROLLBACK_TOKENS:  # never in the round loop; a foreign client's jump
            self.matcher.reset()
            self.consumed, surplus, keep = [], 0, 0
        if surplus:
            self.matcher.rollback(surplus)
            del self.consumed[keep:]
        return all(self.advance(token) for token in output[keep:])

    @property
    def ended(self) -> bool:
        """Whether the output ended (an end-of-sequence token was consumed)."""
        return self.matcher.is_terminated()

    def advance(self, token: int) -> bool:
        if self.ended or not self.matcher.accept_token(token):
            return False
        self.consumed.append(token)
        return True

    def mask(self) -> torch.Tensor:
        """The tokens allowed next, [V] bool (none once the output has ended)."""
        if self.ended:
            return torch.zeros(self.vocab_size, dtype=torch.bool)
        self.matcher.fill_next_token_bitmask(self._bitmask)
        bits = np.unpackbits(self._bitmask.numpy().view(np.uint8), bitorder="little")[: self.vocab_size]
        return torch.from_numpy(bits.view(np.bool_))

    def masks_along(self, drafts: Sequence[int]) -> torch.Tensor:
        """The masks of the positions after each prefix of `drafts` (the verify rows), [K+1, V]
        bool; the matcher ends where it started. Rows after a draft token the grammar forbids
        allow nothing (that draft is rejected before them)."""
        rows, advanced = [self.mask()], 0
        for token in drafts:
            if not self.advance(token):
                break
            advanced += 1
            rows.append(self.mask())
        if advanced:
            self.matcher.rollback(advanced)
            del self.consumed[len(self.consumed) - advanced :]
        rows += [torch.zeros(self.vocab_size, dtype=torch.bool)] * (len(drafts) + 1 - len(rows))
        return torch.stack(rows)


def apply_mask(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Logits [..., V] with the tokens `allowed` [..., V] forbids at -inf; a row that allows
    nothing (after the output ended, or after a forbidden draft) stays as it is, since no token is
    ever committed from it."""
    empty = ~allowed.any(-1, keepdim=True)
    return logits.masked_fill(~(allowed | empty), float("-inf"))
