"""Typed requests and results of the specdec client, and their protobuf forms.

Boundary: the only module of the client that builds or reads `specdec.v1` messages; the clients
in sync.py and aio.py move them over gRPC.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

from google.protobuf.descriptor import FieldDescriptor

from specdec.v1 import common_pb2, orchestrator_pb2

FinishReason = Literal["length", "stop", "eos"]

_FINISH: dict[int, FinishReason] = {
    orchestrator_pb2.FINISH_REASON_LENGTH: "length",
    orchestrator_pb2.FINISH_REASON_STOP: "stop",
    orchestrator_pb2.FINISH_REASON_EOS: "eos",
}


@dataclass(frozen=True)
class Request:
    """One generation; the fields of `GenerateRequest` in protos/specdec/v1/orchestrator.proto.

    Exactly one of `prompt` (raw text) and `messages` (a chat, rendered with the target's chat
    template: `(role, content)` pairs or `{"role": ..., "content": ...}` mappings) must be set.
    `temperature` 0 is greedy; `top_p`, `seed` and `num_speculative_tokens` (K) left as None take
    the server's defaults (no nucleus truncation, a random seed, the server's K); K = 0 is plain
    target-only decoding. `grammar`: structured output, one of {"json_schema": schema text},
    {"json_object": True}, {"regex": ...}, {"ebnf": ...}, {"lark": ...}.
    """

    prompt: str = ""
    messages: Sequence[tuple[str, str] | Mapping[str, str]] = ()
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int = 0
    seed: int | None = None
    stop: Sequence[str] = ()
    num_speculative_tokens: int | None = None
    logprobs: int | None = None  # None: none; n in [0, 20]: each token's and the n most probable
    warped_logprobs: bool = False
    min_p: float = 0.0
    repetition_penalty: float | None = None  # None: 1.0, off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    seed_stable: bool = False
    grammar: Mapping[str, str | bool] | None = None
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool | None = None  # None: true

    def to_proto(self) -> orchestrator_pb2.GenerateRequest:
        message = orchestrator_pb2.GenerateRequest(
            prompt=self.prompt,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            stop=list(self.stop),
            warped_logprobs=self.warped_logprobs,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=dict(self.logit_bias),
            stop_token_ids=list(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
            seed_stable=self.seed_stable,
            grammar=common_pb2.Grammar(**self.grammar) if self.grammar is not None else None,
            min_tokens=self.min_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )
        for turn in self.messages:
            role, content = (turn["role"], turn["content"]) if isinstance(turn, Mapping) else turn
            message.messages.add(role=role, content=content)
        # unset optional fields mean "the server's default", so None must stay unset, not 0
        for name in ("top_p", "seed", "num_speculative_tokens", "logprobs", "repetition_penalty", "skip_special_tokens"):
            if getattr(self, name) is not None:
                setattr(message, name, getattr(self, name))
        return message


def as_request(request: Request | str) -> Request:
    """A bare string is a raw prompt with every other field at its default."""
    return Request(prompt=request) if isinstance(request, str) else request


def _repeated(descriptor) -> bool:
    if hasattr(descriptor, "is_repeated"):  # protobuf >= 6
        return descriptor.is_repeated
    return descriptor.label == descriptor.LABEL_REPEATED


_SCALARS = {FieldDescriptor.CPPTYPE_BOOL: bool, FieldDescriptor.CPPTYPE_FLOAT: float, FieldDescriptor.CPPTYPE_DOUBLE: float}


def _python_type(descriptor: FieldDescriptor) -> type:
    scalar = _SCALARS.get(descriptor.cpp_type, int)
    return tuple[scalar, ...] if _repeated(descriptor) else scalar


def _stats_from_proto(cls, message: orchestrator_pb2.GenerationStats) -> Stats:
    return cls(**{f.name: (tuple if _repeated(f) else type(getattr(message, f.name)))(getattr(message, f.name))
                  for f in message.DESCRIPTOR.fields})


# Per-request statistics (`GenerationStats`): where tokens and time went. Its fields are the proto
# message's, in its order and with its names (documented in protos/specdec/v1/orchestrator.proto),
# so that a field added there reaches clients without a second list to keep in step.
Stats = dataclasses.make_dataclass(
    "Stats",
    [(f.name, _python_type(f)) for f in orchestrator_pb2.GenerationStats.DESCRIPTOR.fields],
    frozen=True,
    namespace={"from_proto": classmethod(_stats_from_proto), "__module__": __name__},
)
Stats.__doc__ = "Per-request statistics: the fields of GenerationStats in protos/specdec/v1/orchestrator.proto."


@dataclass(frozen=True)
class TokenLogprobs:
    """One output token's log-probability and the most probable tokens at its position (most
    probable first): `TokenLogprobs` of orchestrator.proto."""

    logprob: float
    top_token_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


def _logprobs(message: orchestrator_pb2.GenerateResponse) -> tuple[TokenLogprobs, ...]:
    return tuple(TokenLogprobs(t.logprob, tuple(t.top_token_ids), tuple(t.top_logprobs)) for t in message.logprobs)


@dataclass(frozen=True)
class Delta:
    """One message of a stream: the new text and token ids since the previous one (with their
    logprobs when the request asks for them). The last delta carries `finish_reason` and `stats`;
    on the others they are None."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    stats: Stats | None = None
    logprobs: tuple[TokenLogprobs, ...] = ()

    @classmethod
    def from_proto(cls, message: orchestrator_pb2.GenerateResponse) -> Delta:
        if message.finish_reason == orchestrator_pb2.FINISH_REASON_UNSPECIFIED:
            return cls(message.text, tuple(message.token_ids), logprobs=_logprobs(message))
        return cls(message.text, tuple(message.token_ids), _FINISH[message.finish_reason], Stats.from_proto(message.stats),
                   _logprobs(message))


@dataclass(frozen=True)
class Completion:
    """A whole generation: the output text and token ids, why it ended, its statistics, and per
    token its logprobs when the request asks for them."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    stats: Stats = field(repr=False)
    logprobs: tuple[TokenLogprobs, ...] = field(default=(), repr=False)

    @classmethod
    def from_proto(cls, message: orchestrator_pb2.GenerateResponse) -> Completion:
        delta = Delta.from_proto(message)
        return cls(delta.text, delta.token_ids, delta.finish_reason, delta.stats, delta.logprobs)
