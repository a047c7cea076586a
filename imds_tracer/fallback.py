"""Why a capable client fell back to normal mode: state across the requests of one sender.

AWS's SDKs try hardened mode first and fall back to a token-less request when the token PUT
fails with 403/404/405 or times out (AWS SDK reference, "IMDS credential provider"). So a
normal-mode request that follows, within `window` seconds, a failed or unanswered token PUT
of the same sender is not an old client: the client is capable and the path (the PUT
response hop limit in containers, a proxy, a firewall) is what to fix. A sender that makes
token-less requests and also succeeds with a token is "mixed": one of its code paths skips
the token. A sender is its container, else its process. Replay has no process: there the
User-Agent stands in for it, and a token PUT without one counts for every User-Agent (real
clients differ: aws-sdk-js v2 sends its token PUT with no User-Agent and the fallback GETs
with one), so "mixed", an hour's claim, is not made there.
"""
from __future__ import annotations

from typing import Hashable

FALLBACK_WINDOW = 10.0   # seconds from a failed token PUT to the token-less request
MIXED_WINDOW = 3600.0    # a token success this recent makes a token-less request "mixed"
MAX_SENDERS = 4096
# token PUT answers after which the SDKs fall back (a 400 is the client's own bad TTL)
FALLBACK_STATUSES = frozenset({403, 404, 405})


class FallbackTracker:
    def __init__(self, window: float = FALLBACK_WINDOW, mixed_window: float = MIXED_WINDOW):
        self.window = window
        self.mixed_window = mixed_window
        self._failed_put: dict[Hashable, tuple[float, str]] = {}  # sender -> (ts, outcome)
        self._token_ok: dict[Hashable, float] = {}                 # sender -> ts

    def observe(self, sender: Hashable | None, user_agent: str | None, ts: float, mode: str,
                reads: str | None, status: int | None, problems: tuple = ()) -> str | None:
        """Take one request in capture order; the diagnosis of a normal-mode one, else None.
        `sender`: the container or process, None when unknown (replay). A token PUT with
        problems (its own X-Forwarded-For, a bad TTL) was refused for what it sent: that is
        no path to fix, so it does not count."""
        known_sender = sender is not None
        if not known_sender:
            sender = ("user-agent", user_agent)
        if mode == "hardened":
            if reads == "token" and not problems and \
                    (status is None or status in FALLBACK_STATUSES):
                outcome = "unanswered" if status is None else str(status)
                self._remember(self._failed_put, sender, (ts, outcome))
            elif status is not None and 200 <= status < 300 and reads != "token":
                self._remember(self._token_ok, sender, ts)
            return None
        if mode != "normal":
            return None
        failed = self._failed_put.get(sender)
        if failed is None and not known_sender:
            failed = self._failed_put.get(("user-agent", None))
        if failed is not None and 0 <= ts - failed[0] <= self.window:
            return "token_put_" + failed[1]
        ok = self._token_ok.get(sender) if known_sender else None
        if ok is not None and 0 <= ts - ok <= self.mixed_window:
            return "mixed"
        return None

    @staticmethod
    def _remember(table: dict, sender: Hashable, value) -> None:
        if len(table) >= MAX_SENDERS and sender not in table:
            table.clear()  # bounded: a flood of senders forgets, it does not grow
        table[sender] = value
