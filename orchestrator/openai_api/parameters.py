"""OpenAI's side of a request: a request body's parameters -> a GenerationRequest (ParameterError,
400, naming the parameter, for what cannot be mapped), and a domain error -> OpenAI's error shape
and HTTP status (the engine's field names become the request's parameter names).

Parameters: the ones this engine implements are mapped to a GenerationRequest; commonly sent ones
it does not implement yet are accepted at their no-op values (`min_tokens: 0`, `tools: []`,
...) and refused with 400 naming the parameter otherwise; parameters that change nothing
about the output (`user`, `metadata`, ...) are accepted and ignored; anything else is an unknown
parameter, 400. Nothing is ignored silently that would change what the model generates.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any, Callable

from starlette.responses import JSONResponse

from orchestrator.generation import GenerationRequest
from specdec import validation
from specdec.errors import InvalidArgument, SpecdecError
from specdec.grammar import Grammar

# gRPC status code name -> HTTP status and OpenAI error type
STATUS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "FAILED_PRECONDITION": (400, "invalid_request_error"),
    "OUT_OF_RANGE": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "invalid_request_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "UNIMPLEMENTED": (501, "server_error"),
    "UNAVAILABLE": (503, "service_unavailable_error"),
    "DEADLINE_EXCEEDED": (504, "timeout_error"),
}
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_CHOICES = 8  # n: each choice is a generation of its own


class ParameterError(InvalidArgument):
    """A request parameter this API refuses; `openai_code` is the error's `code`."""

    def __init__(self, message: str, param: str, openai_code: str = "invalid_value"):
        super().__init__(message, param)
        self.openai_code = openai_code


class ModelNotFound(SpecdecError):
    code_name = "NOT_FOUND"
    openai_code = "model_not_found"


def error_json(status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind or _kind(status), "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _kind(status: int) -> str:
    fallback = "server_error" if status >= 500 else "invalid_request_error"
    return next((kind for code, kind in STATUS.values() if code == status), fallback)


def error_content(error: SpecdecError, params: dict[str, str]) -> tuple[int, dict, dict[str, str]]:
    """HTTP status, OpenAI error body and headers of a domain error; `params` renames the
    engine's field names to the request's parameter names."""
    status, kind = STATUS.get(error.code_name, (500, "server_error"))
    param = None
    if error.field:
        head, dot, rest = error.field.partition(".")
        base, bracket, index = head.partition("[")
        param = params.get(base, base) + bracket + index + dot + rest
    code = getattr(error, "openai_code", error.code_name.lower())
    headers = {}
    if error.code_name == "RESOURCE_EXHAUSTED":
        headers["retry-after"] = str(max(1, math.ceil(getattr(error, "retry_after_s", 1.0))))
    return status, {"error": {"message": error.message, "type": kind, "param": param, "code": code}}, headers


# Parameters -----------------------------------------------------------------------------------


def _no_value(value) -> bool:
    return value is None


# Parameters of later parts (issue 15) and of other servers: accepted at the value that changes
# nothing (or null), refused otherwise. name -> (test of a no-op value, that value as documented)
NO_OPS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tools": (lambda v: v == [], "[]"),
    "functions": (lambda v: v == [], "[]"),
    "tool_choice": (lambda v: v in ("none", "auto"), '"none"'),
    "function_call": (lambda v: v in ("none", "auto"), '"none"'),
    "modalities": (lambda v: v == ["text"], '["text"]'),
    "audio": (_no_value, "null"),
    "prediction": (_no_value, "null"),
    "reasoning_effort": (_no_value, "null"),
    "verbosity": (_no_value, "null"),
    "web_search_options": (_no_value, "null"),
}
CHAT_NO_OPS = NO_OPS
COMPLETION_NO_OPS = {
    **NO_OPS,
    "echo": (lambda v: v is False, "false"),
    "best_of": (lambda v: v == 1, "1"),
    "suffix": (lambda v: v == "", '""'),
}
# Parameters that do not change the output: accepted, whatever their value, and ignored.
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier"})
COMMON = frozenset({
    "model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream", "stream_options", "num_speculative_tokens",
    "logprobs", "warped_logprobs", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias",
    "stop_token_ids", "ignore_eos", "seed_stable", "min_tokens", "include_stop_str_in_output", "skip_special_tokens",
    "response_format", "structured_outputs",
})
CHAT_PARAMETERS = COMMON | {"messages", "max_completion_tokens", "top_logprobs"}
COMPLETION_PARAMETERS = COMMON | {"prompt"}
MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "refusal", "function_call"}


def _integer(body: dict, name: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParameterError(f"{name} must be an integer, got {json.dumps(value)}", name)
    return value


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParameterError(f"{name} must be a number, got {json.dumps(value)}", name)
    return float(value)


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ParameterError(f"{name} must be true or false, got {json.dumps(value)}", name)
    return value


def _check_names(body: dict, known: frozenset, no_ops: dict) -> None:
    for name, value in body.items():
        if name in known or name in IGNORED:
            continue
        if name in no_ops:
            accepts, default = no_ops[name]
            if value is not None and not accepts(value):
                raise ParameterError(
                    f"{name}={json.dumps(value)} is not supported yet: it would change the output. "
                    f"Leave it out or set it to {default}",
                    name, "unsupported_parameter",
                )
            continue
        raise ParameterError(f"unknown parameter {name!r}", name, "unknown_parameter")


def _logprobs(body: dict, chat: bool) -> tuple[int | None, str]:
    """The number of top alternatives per token (None: no logprobs) and the parameter that says it:
    chat, `logprobs: true` with `top_logprobs` (default 0); completions, `logprobs` (an integer)."""
    name = "top_logprobs" if chat else "logprobs"
    if chat:
        top = _integer(body, "top_logprobs")
        if not _boolean(body, "logprobs"):
            if top:
                raise ParameterError("top_logprobs needs logprobs: true", "top_logprobs")
            return None, name
        value = 0 if top is None else top
    else:
        value = _integer(body, "logprobs")
    if value is not None and not 0 <= value <= validation.MAX_TOP_LOGPROBS:
        raise ParameterError(f"{name} must be in [0, {validation.MAX_TOP_LOGPROBS}], got {value}", name)
    return value, name


def _logit_bias(body: dict) -> tuple[tuple[int, float], ...]:
    """OpenAI's map of token ids (JSON keys, so strings) to biases."""
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise ParameterError("logit_bias must be an object mapping token ids to numbers", "logit_bias")
    parsed = []
    for key, value in bias.items():
        if not (isinstance(key, str) and key.strip().lstrip("-").isdigit()):
            raise ParameterError(f"logit_bias keys must be token ids, got {json.dumps(key)}", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParameterError(f"the bias of token {key} must be a number, got {json.dumps(value)}", "logit_bias")
        parsed.append((int(key), float(value)))
    return tuple(parsed)


def _regex_literal(text: str) -> str:
    return "".join("\\" + c if c in "\\.^$|?*+()[]{}/-" else c for c in text)


def _response_format(value) -> Grammar | None:
    """OpenAI's response_format: text, json_object or json_schema ({"schema": ...})."""
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise ParameterError('response_format must be {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
                             '"json_schema": {"name": ..., "schema": {...}}}', "response_format")
    if value["type"] == "text":
        return None
    if value["type"] == "json_object":
        return Grammar("json_object")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise ParameterError("response_format.json_schema must be an object with a schema object", "response_format.json_schema")
    return Grammar("json_schema", json.dumps(spec["schema"]))


# structured_outputs (vLLM's): key -> (the Grammar it makes of a valid value, or None if invalid)
STRUCTURED = {
    "json": lambda v: Grammar("json_schema", json.dumps(v) if isinstance(v, dict) else v) if isinstance(v, (dict, str)) else None,
    "json_object": lambda v: Grammar("json_object") if v is True else None,
    "regex": lambda v: Grammar("regex", v) if isinstance(v, str) else None,
    "grammar": lambda v: Grammar("ebnf", v) if isinstance(v, str) else None,
    "choice": lambda v: Grammar("regex", "(" + "|".join(_regex_literal(c) for c in v) + ")")
    if isinstance(v, list) and v and all(isinstance(c, str) for c in v) else None,
}


def _grammar(body: dict) -> tuple[Grammar | None, str]:
    """The request's grammar and the parameter that set it: OpenAI's response_format, or vLLM's
    structured_outputs with one of json (a schema), json_object, regex, grammar (EBNF), choice."""
    fmt, structured = body.get("response_format"), body.get("structured_outputs")
    grammar = _response_format(fmt) if fmt is not None else None
    if structured is None:
        return grammar, "response_format"
    if grammar is not None:
        raise ParameterError("set response_format or structured_outputs, not both", "structured_outputs")
    if not isinstance(structured, dict) or len(structured) != 1 or next(iter(structured)) not in STRUCTURED:
        raise ParameterError(f"structured_outputs takes one of {', '.join(STRUCTURED)}", "structured_outputs")
    (key, value), = structured.items()
    grammar = STRUCTURED[key](value)
    if grammar is None:
        raise ParameterError(f"structured_outputs.{key} has the wrong type", f"structured_outputs.{key}")
    return grammar, "structured_outputs"


def _token_ids(body: dict, name: str) -> tuple[int, ...]:
    ids = body.get(name)
    if ids is None:
        return ()
    if not isinstance(ids, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
        raise ParameterError(f"{name} must be a list of token ids", name)
    return tuple(ids)


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise ParameterError("stop must be a string or a list of strings", "stop")


def _message_content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else None
                raise ParameterError(
                    f"content parts must be text parts ({{\"type\": \"text\", \"text\": ...}}), got type {json.dumps(kind)}",
                    f"{where}.content[{index}]", "unsupported_parameter",
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise ParameterError("content must be a string or a list of text parts", f"{where}.content")


def _messages(body: dict) -> tuple[tuple[str, str], ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ParameterError("messages must be a non-empty list of messages", "messages")
    parsed = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ParameterError("each message must be an object with role and content", where)
        for key, value in message.items():
            if key not in MESSAGE_KEYS:
                raise ParameterError(f"unknown message field {key!r}", f"{where}.{key}", "unknown_parameter")
            if key in ("tool_calls", "function_call") and value:
                raise ParameterError("tool calls are not supported", f"{where}.{key}", "unsupported_parameter")
        role = message.get("role")
        if not isinstance(role, str):
            raise ParameterError("role must be a string", f"{where}.role")
        # OpenAI's newer name for the system role; chat templates know "system"
        parsed.append(("system" if role == "developer" else role, _message_content(message.get("content"), where)))
    return tuple(parsed)


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt):
        raise ParameterError("one prompt per request: send a string (or a list of one string)", "prompt", "unsupported_parameter")
    if isinstance(prompt, list):
        raise ParameterError("token-id prompts are not supported: send the prompt as a string", "prompt", "unsupported_parameter")
    raise ParameterError("prompt must be a string", "prompt")


@dataclass(frozen=True)
class ParsedRequest:
    generation: GenerationRequest
    stream: bool
    include_usage: bool
    params: dict[str, str]  # the engine's field names -> this request's parameter names
    default_max_tokens: bool  # max_tokens left out: as many as the context holds (chat)
    n: int = 1  # choices: generations of the same request, choice i seeded with seed + i

    def choices(self) -> list[GenerationRequest]:
        """The generation of each choice: with a seed, choice i draws with seed + i, so that sampled
        choices differ and the request is still reproducible."""
        seeded = self.generation.seed is not None
        return [replace(self.generation, seed=(self.generation.seed + i) % (1 << 64)) if seeded else self.generation for i in range(self.n)]


def parse_request(body: dict, chat: bool) -> ParsedRequest:
    """A GenerationRequest from an OpenAI request body; ParameterError (400) for what it cannot map."""
    _check_names(body, CHAT_PARAMETERS if chat else COMPLETION_PARAMETERS, CHAT_NO_OPS if chat else COMPLETION_NO_OPS)
    n = _integer(body, "n", 1)
    if not 1 <= n <= MAX_CHOICES:
        raise ParameterError(f"n must be in [1, {MAX_CHOICES}], got {n}", "n")
    max_tokens = _integer(body, "max_tokens")
    max_param = "max_tokens"
    if chat and body.get("max_completion_tokens") is not None:  # the newer name wins
        max_param, max_tokens = "max_completion_tokens", _integer(body, "max_completion_tokens")
    seed = _integer(body, "seed")
    if seed is not None and not 0 <= seed < 1 << 64:
        raise ParameterError(f"seed must be in [0, 2^64), got {seed}", "seed")
    top_k = _integer(body, "top_k", 0)
    stream = _boolean(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats", "include_obfuscation"}:
        raise ParameterError("stream_options takes include_usage", "stream_options")
    include_usage = _boolean(options, "include_usage")
    if options.get("continuous_usage_stats"):
        raise ParameterError(
            "continuous_usage_stats is not supported", "stream_options.continuous_usage_stats", "unsupported_parameter"
        )
    logprobs, logprobs_param = _logprobs(body, chat)
    grammar, grammar_param = _grammar(body)
    generation = GenerationRequest(
        prompt="" if chat else _prompt(body),
        messages=_messages(body) if chat else (),
        max_new_tokens=max_tokens if max_tokens is not None else (0 if chat else COMPLETIONS_DEFAULT_MAX_TOKENS),
        temperature=_number(body, "temperature", 1.0),  # OpenAI's default: sampling at temperature 1
        top_p=_number(body, "top_p", 1.0),
        top_k=0 if top_k == -1 else top_k,  # -1: disabled, as vLLM spells it
        seed=seed,
        stop=_stops(body),
        num_speculative_tokens=_integer(body, "num_speculative_tokens"),
        logprobs=logprobs,
        warped_logprobs=_boolean(body, "warped_logprobs"),
        min_p=_number(body, "min_p", 0.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0),
        presence_penalty=_number(body, "presence_penalty", 0.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0),
        logit_bias=_logit_bias(body),
        stop_token_ids=_token_ids(body, "stop_token_ids"),
        ignore_eos=_boolean(body, "ignore_eos"),
        seed_stable=_boolean(body, "seed_stable"),
        min_tokens=_integer(body, "min_tokens", 0),
        include_stop_str_in_output=_boolean(body, "include_stop_str_in_output"),
        skip_special_tokens=_boolean(body, "skip_special_tokens", True),
        grammar=grammar,
    )
    params = {"max_new_tokens": max_param, "prompt": "messages" if chat else "prompt", "logprobs": logprobs_param, "grammar": grammar_param}
    return ParsedRequest(generation, stream, include_usage, params, chat and max_tokens is None, n)
