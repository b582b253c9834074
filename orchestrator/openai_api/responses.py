"""The bodies the HTTP API answers a generation with, in OpenAI's shapes: a unary chat.completion
or text_completion, or its server-sent events (chunks, a usage chunk when stream_options asks,
`data: [DONE]`); `usage`, `logprobs` when asked (LogprobsJson), and the extension `specdec_stats`
(GenerationStats of orchestrator.proto, same names). The text is the engine's, joined or passed on as it comes. After the headers an error
can no longer change the HTTP status: it is the stream's last event, before `data: [DONE]`."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, AsyncIterator

from orchestrator.generation import GenerationEvent
from orchestrator.openai_api.parameters import error_content
from orchestrator.stats import GenerationStats
from specdec.errors import SpecdecError
from specdec.v1 import orchestrator_pb2

if TYPE_CHECKING:
    from orchestrator.openai_api.app import Generation

log = logging.getLogger(__name__)

FINISH_REASONS = {"length": "length", "stop": "stop", "eos": "stop"}
STATS_FIELDS = tuple(f.name for f in orchestrator_pb2.GenerationStats.DESCRIPTOR.fields)


def stats_json(stats: GenerationStats) -> dict:
    """`specdec_stats`: the fields of GenerationStats in orchestrator.proto, same names."""
    return {name: (list(value) if isinstance(value := getattr(stats, name), list) else value) for name in STATS_FIELDS}


UNLIKELY = -9999.0  # what JSON gets for a logprob of -inf (a token the warped distribution excludes), as vLLM


def _finite(logprob: float) -> float:
    return max(logprob, UNLIKELY)


class LogprobsJson:
    """A generation's logprobs in OpenAI's shapes, event by event: chat's `{"content": [...]}` or
    completions' `tokens` / `token_logprobs` / `top_logprobs` / `text_offset`. A token's text is
    its own decoding (a part of a character decodes to U+FFFD); `bytes` its UTF-8."""

    def __init__(self, tokenizer, chat: bool):
        self.tokenizer, self.chat, self.offset = tokenizer, chat, 0

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self._token(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}

    def of(self, event: GenerationEvent) -> dict | None:
        if event.logprobs is None:
            return None
        rows = list(zip(event.token_ids, event.logprobs.logprobs, event.logprobs.top_token_ids, event.logprobs.top_logprobs))
        if self.chat:
            content = [self._entry(t, v) | {"top_logprobs": [self._entry(i, w) for i, w in zip(ids, values)]}
                       for t, v, ids, values in rows]
            return {"content": content, "refusal": None}
        tokens = [self._token(t) for t, *_ in rows]
        offsets = []
        for token in tokens:
            offsets.append(self.offset)
            self.offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [_finite(v) for _, v, _, _ in rows],
            "top_logprobs": [{self._token(i): _finite(w) for i, w in zip(ids, values)} for *_, ids, values in rows],
            "text_offset": offsets,
        }


def _sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


def usage_of(stats: list[GenerationStats]) -> dict:
    """The usage of a request's choices: one prompt, every choice's completion."""
    completion = sum(s.generated_tokens for s in stats)
    return {"prompt_tokens": stats[0].prompt_tokens, "completion_tokens": completion, "total_tokens": stats[0].prompt_tokens + completion}


def unary_body(choices: list[list[GenerationEvent]], chat: bool, model: str, tokenizer=None) -> dict:
    """The answer of a request with one or more choices (each the events of one generation);
    `specdec_stats` is the first choice's, and with several choices each one carries its own."""
    bodies, stats = [], []
    for index, events in enumerate(choices):
        whole = GenerationEvent.joined(events)
        last = events[-1]
        choice: dict = {"index": index}
        if chat:
            choice["message"] = {"role": "assistant", "content": whole.text}
        else:
            choice["text"] = whole.text
        choice |= {"logprobs": LogprobsJson(tokenizer, chat).of(whole), "finish_reason": FINISH_REASONS[last.finish_reason]}
        if len(choices) > 1:
            choice["specdec_stats"] = stats_json(last.stats)
        bodies.append(choice)
        stats.append(last.stats)
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": bodies,
        "usage": usage_of(stats),
        "specdec_stats": stats_json(stats[0]),
    }


async def sse_chunks(generations: list[Generation], firsts: list[GenerationEvent], chat: bool, model: str, include_usage: bool,
                     params: dict[str, str], tokenizer=None) -> AsyncIterator[bytes]:
    """The events of one or more generations (the choices, their first events already taken) as
    chunks, each choice's in its order, the choices interleaved as their events come."""
    head = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
    }
    logprobs_json = [LogprobsJson(tokenizer, chat) for _ in generations]

    def chunk(index: int, text: str | None, finish_reason: str | None = None, role: bool = False, logprobs: dict | None = None,
              **extra) -> bytes:
        if chat:
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            choice = {"index": index, "delta": delta}
        else:
            choice = {"index": index, "text": text or ""}
        choice |= {"logprobs": logprobs, "finish_reason": finish_reason}
        return _sse(head | {"choices": [choice]} | ({"usage": None} if include_usage else {}) | extra)

    events: asyncio.Queue = asyncio.Queue()

    async def follow(index: int, generation: Generation, event: GenerationEvent) -> None:
        try:
            while True:
                events.put_nowait((index, event))
                if event.finish_reason is not None:
                    return
                event = await generation.next()
        except Exception as error:  # noqa: BLE001 - handed to the stream, which ends with it
            events.put_nowait((index, error))

    followers = [asyncio.ensure_future(follow(i, g, e)) for i, (g, e) in enumerate(zip(generations, firsts))]
    try:
        if chat:
            for index in range(len(generations)):
                yield chunk(index, "", role=True)
        finished: dict[int, GenerationStats] = {}
        while len(finished) < len(generations):
            index, event = await events.get()
            if isinstance(event, Exception):
                raise event
            if event.text or (event.logprobs is not None and event.token_ids):  # a token's logprobs may come before its text
                yield chunk(index, event.text, logprobs=logprobs_json[index].of(event))
            if event.finish_reason is not None:
                finished[index] = event.stats
                yield chunk(index, None if chat else "", FINISH_REASONS[event.finish_reason], specdec_stats=stats_json(event.stats))
        if include_usage:
            yield _sse(head | {"choices": [], "usage": usage_of([finished[i] for i in range(len(generations))])})
    except SpecdecError as error:  # after the headers: the error is the stream's last event
        _, body, _ = error_content(error, params)
        yield _sse(body)
    except Exception as error:  # noqa: BLE001
        log.error("internal error in a streamed generation", exc_info=error)
        yield _sse({"error": {"message": f"internal error: {type(error).__name__}: {error}", "type": "server_error",
                              "param": None, "code": "internal"}})
    finally:
        for follower, generation in zip(followers, generations):
            follower.cancel()
            generation.cancel()  # a no-op once it finished; frees both sessions when the client went away
    yield _sse("[DONE]")
