"""Turning generated token ids into streamed text: incremental detokenization that never splits a
multi-byte character, and stop strings that may span rounds and are never streamed, not even in
part.

Each token is decoded in a short window of the tokens around it (Text Generation Inference's
prefix/read offsets), not by decoding the whole output again, which would cost O(n^2) over a long
generation. A window whose text ends in U+FFFD (an incomplete UTF-8 sequence of byte-level BPE)
waits for the next token; a trailing piece that could still grow into a stop string is held back
until the next token settles it.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, tokenizer, stops: list[str], include_stop: bool = False, skip_special_tokens: bool = True):
        """`include_stop`: the text ends after the stop string that ended it instead of before;
        `skip_special_tokens`: special tokens (EOS, chat markers) decode to nothing."""
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.include_stop = include_stop
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""  # decoded text of token_ids[:self._read]
        self._prefix = 0  # start of the previous window: decoded again as context for the next token
        self._read = 0
        self.emitted = 0  # characters of self.text already released
        self.end: int | None = None  # where the text ends once a stop string appeared (its start, or its end when included)

    @property
    def stopped(self) -> bool:
        return self.end is not None

    def add(self, token: int) -> bool:
        """Append one token; True when a stop string is now complete (generation must stop)."""
        self.token_ids.append(token)
        self._decode_new(final=False)
        longest = max((len(s) for s in self.stops), default=0)
        search_from = max(0, self.emitted - longest)
        hits = [(i, s) for i, s in ((self.text.find(s, search_from), s) for s in self.stops) if i >= 0]
        if hits:
            start, stop = min(hits)
            self.end = start + len(stop) if self.include_stop else start
        return self.stopped

    def release(self, final: bool = False) -> str:
        """Text that is now certain and was not released before; everything left when final."""
        if final and self.end is None:
            self._decode_new(final=True)
        end = self.end if self.end is not None else len(self.text)
        if not final and self.end is None:
            end = self._settled(end)
        delta = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta

    def _decode_new(self, final: bool) -> None:
        """Append the text of tokens not yet decoded, unless it ends mid-character (and not final)."""
        if self._read == len(self.token_ids):
            return
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False)  # noqa: E731
        before = decode(self.token_ids[self._prefix : self._read])
        window = decode(self.token_ids[self._prefix :])
        if not final and (len(window) <= len(before) or window.endswith(REPLACEMENT)):
            return
        self.text += window[len(before) :]
        self._prefix, self._read = self._read, len(self.token_ids)

    def _settled(self, end: int) -> int:
        while end > self.emitted and self.text[end - 1] == REPLACEMENT:
            end -= 1
        for length in range(min(max((len(s) for s in self.stops), default=1) - 1, end - self.emitted), 0, -1):
            if any(stop.startswith(self.text[end - length : end]) for stop in self.stops):
                return end - length
        return end
