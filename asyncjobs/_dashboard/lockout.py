"""Failed basic-auth logins per client, and the wait they earn (answered 429).

A client is its address from the ASGI scope (``scope["client"]``): an IPv4 address,
or the /64 network of an IPv6 one (one host usually holds a whole /64; an
IPv4-mapped address counts as its IPv4 address). A request without an address
(a Unix socket, some test servers) counts in one shared bucket, so guessing stays
limited; per username would not help, since the dashboard has a single username.
The price: one guesser then keeps every such client locked out, which is why the
server should report addresses.
Behind a reverse proxy every client has the proxy's address unless the server
takes the real one from the proxy's headers (``uvicorn --proxy-headers
--forwarded-allow-ips=...``); asyncjobs never reads ``X-Forwarded-For`` itself,
which anyone can send.

Only well-formed basic credentials that do not match count (a missing header,
another scheme or garbage can never be a guess). Each is answered 401 as usual;
the ``LOCK_AFTER``-th in a row also locks the client for ``FIRST_LOCK`` seconds,
and each wrong one after a lock has passed doubles it, up to ``LONGEST_LOCK``.
A locked client's requests are answered 429 with ``Retry-After`` before any
credentials are looked at, and do not lengthen the lock. Right credentials (once
the lock has passed) forget the client; so do ``FORGET_AFTER`` seconds without a
failure. One warning is logged when a client is first locked: its key, never the
username or password.

The table lives in the process and holds at most ``MAX_CLIENTS`` clients: the
least recently failed go first, so an attacker with more addresses than that can
still rotate through them. Several processes each keep their own table. A long
random password remains the defence; this only makes guessing slow.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("asyncjobs")

LOCK_AFTER = 5
"""Wrong credentials in a row that lock a client."""
FIRST_LOCK = 2.0
"""Seconds of the first lock; each further failure doubles it."""
LONGEST_LOCK = 300.0
"""The longest lock, in seconds: then one guess per five minutes."""
FORGET_AFTER = 3600.0
"""Seconds without a failure after which a client starts afresh."""
MAX_CLIENTS = 10_000
"""Clients remembered at once (about a hundred bytes each)."""

MAX_HOST = 64
"""Characters of a client's host that count (an address takes at most 45; a host that
is not one, forwarded by a proxy, is cut to this)."""

SHARED = ""
"""The key of every request whose scope has no client address."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Strikes:
    """One client's failures in a row, its last failure and the end of its lock."""

    failures: int
    last_at: float
    locked_until: float


class Lockout:
    """Counts failed logins per client and says how long a client must wait."""

    def __init__(self, *, max_clients: int | None = None) -> None:
        self.max_clients = MAX_CLIENTS if max_clients is None else max_clients
        # Least recently failed first: expired and evicted entries leave from the front.
        self._strikes: OrderedDict[str, Strikes] = OrderedDict()

    @property
    def active(self) -> bool:
        """Whether any client failed lately (if not, a login needs no look-up)."""
        return bool(self._strikes)

    def __len__(self) -> int:
        return len(self._strikes)

    def wait(self, client: str, now: float) -> float:
        """Seconds ``client`` must still wait before it may try again (0.0: it may)."""
        strikes = self._strikes.get(client)
        if strikes is None or strikes.locked_until <= now:
            return 0.0
        # The clock is wall time: stepped back, it would stretch the lock by the step.
        return min(strikes.locked_until - now, lock_for(strikes.failures))

    def succeeded(self, client: str) -> None:
        self._strikes.pop(client, None)

    def failed(self, client: str, now: float) -> None:
        """Count a wrong login by ``client``; lock it once it has ``LOCK_AFTER`` in a row."""
        strikes = self._strikes.pop(client, None)
        failures = 1
        if strikes is not None and now - strikes.last_at < FORGET_AFTER:
            failures = strikes.failures + 1
        lock = lock_for(failures)
        self._strikes[client] = Strikes(failures=failures, last_at=now, locked_until=now + lock)
        self._make_room(now)
        if failures == LOCK_AFTER:
            logger.warning(
                "dashboard: %s locked out after %d failed logins (%d s, doubling per failure)",
                repr(client) if client else "every client without an address",
                failures,
                lock,
            )

    def _make_room(self, now: float) -> None:
        while self._strikes:
            oldest = next(iter(self._strikes.values()))
            if len(self._strikes) <= self.max_clients and now - oldest.last_at < FORGET_AFTER:
                return
            self._strikes.popitem(last=False)


def lock_for(failures: int) -> float:
    """Seconds a client is locked after ``failures`` wrong logins in a row."""
    if failures < LOCK_AFTER:
        return 0.0
    return min(FIRST_LOCK * 2.0 ** min(failures - LOCK_AFTER, 32), LONGEST_LOCK)


def retry_after(wait: float) -> str:
    """A ``Retry-After`` value: whole seconds, rounded up, at least one."""
    return str(max(1, math.ceil(wait)))


def client_key(scope: Mapping[str, Any]) -> str:
    """Whom a request's failures count against: see the module docstring."""
    client = scope.get("client")
    if not client:
        return SHARED
    host = str(client[0])[:MAX_HOST]  # a name a proxy forwarded: any length
    if ":" not in host:
        return host
    try:
        address = ipaddress.IPv6Address(host)
    except ValueError:
        return host
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, 64), strict=False))
