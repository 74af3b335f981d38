"""TokenStream: what a request's caller reads, from a thread or from asyncio."""

import asyncio
import queue
from dataclasses import dataclass


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


class TokenStream:
    """Outputs of one request, in order. Written by the step loop, read by the caller.

    Created inside a running event loop, it is read with `async for`; otherwise with a
    plain `for`. Either way the step loop never blocks on a slow reader.
    """

    def __init__(self, request_id: str):
        self.request_id = request_id
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            self._queue: asyncio.Queue | queue.Queue = asyncio.Queue()
        except RuntimeError:
            self._loop, self._queue = None, queue.Queue()

    def put(self, output: Output) -> None:
        """Called by the step loop's thread."""
        if self._loop is None:
            self._queue.put(output)
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._queue.put_nowait, output)

    def __iter__(self):
        while True:
            output = self._queue.get()
            yield output
            if output.finish_reason is not None:
                return

    async def __aiter__(self):
        while True:
            output = await self._queue.get()
            yield output
            if output.finish_reason is not None:
                return

    def result(self) -> Output:
        """Block until the request ends; everything it produced as one Output."""
        text, ids, last = [], [], None
        for last in self:
            text.append(last.text)
            ids.extend(last.token_ids)
        if last.error is not None:
            raise last.error
        return Output("".join(text), ids, last.finish_reason, last.prompt_tokens,
                      last.completion_tokens)
