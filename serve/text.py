"""Incremental detokenization with stop sequences, so streamed text equals the final text.

After each new token the whole completion is decoded again (``skip_special_tokens``) and only
the new suffix is released, except what might still change: a trailing U+FFFD (an incomplete
multi-byte character) and the longest suffix that is a prefix of a stop sequence. A stop
sequence ends the completion and is not part of the text (OpenAI's semantics). The
concatenated deltas plus :meth:`TextState.rest` are always exactly :attr:`TextState.text`.
"""

from __future__ import annotations


class TextState:
    def __init__(self, tokenizer, stops: list[str]):
        self.tok, self.stops = tokenizer, list(stops)
        self.ids: list[int] = []
        self.text = ""  # the completion so far (cut at a stop sequence once one appeared)
        self.sent = 0  # characters of ``text`` already released
        self.stopped = False

    def push(self, token_id: int, final: bool = False) -> str:
        """Add a token; returns the text now safe to release. ``stopped`` says a stop matched."""
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self.rest()
        self.text = text
        if final:
            return self.rest()
        hold = 1 if text.endswith("\ufffd") else 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return self._release(len(text) - hold)

    def rest(self) -> str:
        """Everything not yet released (at the end of the completion)."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out = self.text[self.sent:upto]
        self.sent = upto
        return out
