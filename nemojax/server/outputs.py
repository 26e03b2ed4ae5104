"""One choice's output as it grows: token ids -> text (stop strings applied) -> reasoning, content and
tool calls, as deltas for streaming and as a whole for a plain response.

Text is decoded from all the ids so far and released only up to what can no longer change: not a
trailing incomplete UTF-8 character, nor the end that may still begin a stop string. The text ends
before the first stop string; a final end-of-sequence token is not text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer

from nemojax.generate.scheduler import Ticket
from nemojax.server.parsers import OutputParser, Parts, ToolCall


@dataclasses.dataclass
class Delta:
    """What one update of a choice adds."""

    parts: Parts
    token_ids: list[int]  # the tokens this update covers (for log-probabilities)
    first: int  # index of token_ids[0] in the choice's output


class ChoiceOutput:
    """`top`: alternatives per token for log-probabilities; `parser` None: all text is content."""

    def __init__(self, ticket: Ticket, tokenizer: Tokenizer | None, eos_ids: Sequence[int], stop: Sequence[str],
                 parser: OutputParser | None, top: int = 0) -> None:
        self.ticket, self.tokenizer, self.eos_ids, self.top = ticket, tokenizer, tuple(eos_ids), top
        self.stop = tuple(stop)
        self.parser = parser
        self.text_sent = 0  # characters of text released
        self.tokens_sent = 0
        self.stopped = False  # a stop string was found: nothing after it is text
        self.tool_calls: list[ToolCall] = []
        self.reasoning, self.content = "", ""
        self.done = False

    def update(self) -> Delta | None:
        """The new part since the last update (None when there is nothing new); the last one when the
        ticket has finished."""
        if self.done:
            return None
        finished = self.ticket.finished  # read first: once set, the ids are complete
        ids = list(self.ticket.output_ids)
        if self.ticket.logprobs:
            ids = ids[:len(self.ticket.token_logprobs)]
        visible = ids[:-1] if ids and ids[-1] in self.eos_ids and not self.ticket.request.ignore_eos else ids
        text = "" if self.tokenizer is None else self.tokenizer.decode(visible, skip_special_tokens=False)
        cut = self._stop_at(text)
        if cut is not None:
            text, self.stopped = text[:cut], True
        if not finished and not self.stopped:
            text = text[:len(text) - self._held(text)]
        new_text = text[self.text_sent:]
        self.text_sent = max(self.text_sent, len(text))
        parts = Parts()
        if self.parser is None:
            parts.content = new_text
        else:
            parts = self.parser.feed(new_text)
            if finished:
                tail = self.parser.finish()
                parts = Parts(parts.reasoning + tail.reasoning, parts.content + tail.content,
                              parts.tool_calls + tail.tool_calls)
        token_ids = ids[self.tokens_sent:]
        first = self.tokens_sent
        self.tokens_sent = len(ids)
        self.reasoning += parts.reasoning
        self.content += parts.content
        self.tool_calls += parts.tool_calls
        self.done = finished
        if not parts and not token_ids and not finished:
            return None
        return Delta(parts, token_ids, first)

    @property
    def finish_reason(self) -> str:
        reason = self.ticket.finish_reason or "stop"
        if self.stopped:
            reason = "stop"
        if self.tool_calls and reason == "stop":
            return "tool_calls"
        return reason

    def _stop_at(self, text: str) -> int | None:
        hits = [text.find(s) for s in self.stop if s in text]
        return min(hits) if hits else None

    def _held(self, text: str) -> int:
        """Characters at the end of `text` that may still change: an incomplete character, or the start of
        a stop string."""
        held = 1 if text.endswith("\ufffd") else 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if stop.startswith(text[len(text) - n:]):
                    held = max(held, n)
                    break
        return held


def chat_logprobs(output: ChoiceOutput, token_ids: Sequence[int], first: int) -> dict[str, Any]:
    """OpenAI chat `logprobs`: {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}."""
    ticket, tokenizer = output.ticket, output.tokenizer
    entries = []
    for n, token in enumerate(token_ids):
        at = first + n
        entries.append({**_token_entry(tokenizer, token, ticket.token_logprobs[at]), "top_logprobs": [
            _token_entry(tokenizer, i, p) for i, p in ticket.top_logprobs[at][:output.top]]})
    return {"content": entries}


def completion_logprobs(output: ChoiceOutput, token_ids: Sequence[int], first: int, offset: int) -> dict[str, Any]:
    """OpenAI completions `logprobs`: tokens, token_logprobs, top_logprobs (token -> logprob), text_offset."""
    ticket, tokenizer = output.ticket, output.tokenizer
    tokens, logprobs, tops, offsets = [], [], [], []
    for n, token in enumerate(token_ids):
        at = first + n
        text = _token_text(tokenizer, token)
        tokens.append(text)
        logprobs.append(ticket.token_logprobs[at])
        tops.append({_token_text(tokenizer, i): p for i, p in ticket.top_logprobs[at][:output.top]})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def _token_text(tokenizer: Tokenizer | None, token: int) -> str:
    return str(token) if tokenizer is None else tokenizer.decode([token], skip_special_tokens=False)


def _token_entry(tokenizer: Tokenizer | None, token: int, logprob: float) -> dict[str, Any]:
    text = _token_text(tokenizer, token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", errors="replace"))}
