"""TokenStream: what a request's caller reads, from a thread or from asyncio; and
`releasable`, how much of the text decoded so far may be streamed (stop strings)."""

import asyncio
import threading
from collections import deque
from dataclasses import dataclass


@dataclass
class TokenLogprob:
    """A generated token's log-probability, and the most likely tokens' at its position
    (best first; as many as asked, fewer where a grammar allowed fewer)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Output:
    """One piece of a request's output. The last one has `finish_reason` set.

    finish_reason: None while running; "stop" (end of sequence or a stop string),
    "length" (max_tokens or the context limit), "cancelled", or "error" (see `error`).
    """

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Exception | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token in token_ids, when asked


class TokenStream:
    """Outputs of one request, in order. Written by the step loop, read by the caller.

    Read it with a plain `for` in a thread or with `async for` in an event loop, whichever
    thread created it; the step loop never blocks on a slow reader.
    """

    def __init__(self, request_id: str):
        self.request_id = request_id
        self._outputs: deque[Output] = deque()
        self._ready = threading.Condition()
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    def put(self, output: Output) -> None:
        """Called by the step loop's thread."""
        with self._ready:
            self._outputs.append(output)
            self._ready.notify()
            waiter = self._waiter
        if waiter is not None and not waiter[0].is_closed():
            waiter[0].call_soon_threadsafe(waiter[1].set)

    def __iter__(self):
        while True:
            with self._ready:
                self._ready.wait_for(lambda: self._outputs)
                output = self._outputs.popleft()
            yield output
            if output.finish_reason is not None:
                return

    async def __aiter__(self):
        arrived = asyncio.Event()
        with self._ready:
            self._waiter = (asyncio.get_running_loop(), arrived)
        while True:
            with self._ready:
                output = self._outputs.popleft() if self._outputs else None
                if output is None:
                    arrived.clear()  # under the lock: a put after this sets it again
            if output is None:
                await arrived.wait()
                continue
            yield output
            if output.finish_reason is not None:
                return

    def result(self) -> Output:
        """Block until the request ends; everything it produced as one Output."""
        whole = joined(list(self))
        if whole.error is not None:
            raise whole.error
        return whole


def joined(outputs: list[Output]) -> Output:
    """A request's outputs, in order, as one: all the text, tokens and logprobs, and the
    last one's finish reason, counts and error."""
    last, logprobs = outputs[-1], None
    if any(out.logprobs is not None for out in outputs):
        logprobs = [entry for out in outputs for entry in out.logprobs or []]
    return Output("".join(out.text for out in outputs),
                  [token for out in outputs for token in out.token_ids], last.finish_reason,
                  last.prompt_tokens, last.completion_tokens, last.error, logprobs)


def releasable(full: str, sent: int, stops: list[str], final: bool) -> tuple[str, int, bool]:
    """The text of `full` (the output decoded so far) that may be streamed now, past the
    `sent` characters already streamed: (text, the new `sent`, whether a stop string hit).

    A stop string ends the text where it starts. Until the output is `final`, what may
    still grow into a stop string or complete a character (a trailing U+FFFD) is held back.
    """
    hits = [i for i in (full.find(stop) for stop in stops) if i >= 0]
    if hits:
        end = max(min(hits), sent)
        return full[sent:end], end, True
    end = len(full)
    if not final:
        if full.endswith("\ufffd"):  # a multi-byte character still incomplete
            end -= 1
        for stop in stops:  # a suffix that may grow into a stop string
            for k in range(min(len(stop) - 1, end), 0, -1):
                if full[:end].endswith(stop[:k]):
                    end -= k
                    break
    end = max(end, sent)
    return full[sent:end], end, False
