"""Each API key's fair share of the engine: requests in flight and tokens per second.

One engine serves every tenant from one queue; without a share, one key could fill it (and
the batch) and every other tenant would wait or get 429s. A key over its share gets a 429
(`Overloaded`) with `Retry-After`, and only that key does:

- streams: requests of the key in flight at once (default `--max-streams-per-key`, the
  engine's max_num_seqs: one key can fill the running batch, never the whole queue);
- tokens per second (default `--tokens-per-s-per-key`, 0: off): a token bucket holding
  BURST_S seconds' worth, charged with each request's prompt and output tokens when it
  ends; a key whose bucket is empty waits until it has refilled to zero.

A key's own entry in the keys file (server/auth.py) overrides either default. A daemon
without keys has one user, and no share to keep.
"""

import math
import threading
import time
from dataclasses import dataclass

from lorag.errors import InvalidRequest, Overloaded
from lorag.server.tenancy import Caller

BURST_S = 10.0  # a key may spend this many seconds of its rate at once


@dataclass
class _Share:
    tokens: float  # the bucket's level; refilled at the key's rate, up to BURST_S of it
    updated: float  # when it was last refilled (time.monotonic)
    streams: int = 0  # requests in flight


class KeyQuotas:
    """Admits a key's request or refuses it with Overloaded; told when each one ends."""

    def __init__(self, max_streams: int, tokens_per_s: float = 0.0):
        if max_streams < 1:
            raise InvalidRequest(f"max_streams_per_key must be >= 1, got {max_streams}",
                                 field="max_streams_per_key")
        if tokens_per_s < 0:
            raise InvalidRequest(f"tokens_per_s_per_key must be >= 0, got {tokens_per_s}",
                                 field="tokens_per_s_per_key")
        self.max_streams, self.tokens_per_s = max_streams, tokens_per_s
        self.shares: dict[str, _Share] = {}
        self.lock = threading.Lock()

    def admit(self, caller: Caller) -> None:
        """Count a new request of `caller`'s key, or refuse it (Overloaded, retry_after).
        A daemon without keys has one user, whose share is the whole engine."""
        if caller.key_id is None:
            return
        streams = caller.max_streams or self.max_streams
        rate = caller.tokens_per_s or self.tokens_per_s
        with self.lock:
            share = self.shares.get(caller.key_id) or self.shares.setdefault(
                caller.key_id, _Share(rate * BURST_S, time.monotonic()))
            self._refill(share, rate)
            if share.streams >= streams:
                raise Overloaded(f"this API key has {share.streams} requests in flight, its "
                                 f"share of the daemon; retry when one of them ends",
                                 retry_after=1)
            if rate and share.tokens < 0:
                raise Overloaded(f"this API key used its {rate:g} tokens per second; retry "
                                 "in a moment", retry_after=math.ceil(-share.tokens / rate))
            share.streams += 1

    def release(self, caller: Caller, tokens: int) -> None:
        """A request of `caller`'s key ended, having used `tokens` (prompt and output)."""
        if caller.key_id is None:
            return
        rate = caller.tokens_per_s or self.tokens_per_s
        with self.lock:
            share = self.shares[caller.key_id]
            self._refill(share, rate)
            share.streams -= 1
            share.tokens -= tokens
            if share.streams == 0 and share.tokens >= rate * BURST_S:
                del self.shares[caller.key_id]  # idle and full: nothing to remember

    @staticmethod
    def _refill(share: _Share, rate: float) -> None:
        now = time.monotonic()
        share.tokens = min(rate * BURST_S, share.tokens + (now - share.updated) * rate)
        share.updated = now
