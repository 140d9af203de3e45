"""What the router tells of each request's life to whoever watches it (its metrics).

The router calls an observer inline, so its calls must be cheap and must not raise (one that
does is logged and ignored). `RouterMetrics` is the one Baton has.
"""

from __future__ import annotations

from typing import Protocol

from baton.outputs import RequestOutput
from baton.records import PerfRecord


class RequestObserver(Protocol):
    """Told by the router of each request's life (metrics); calls are cheap and run inline.

    `failed` also hears of requests refused before admission (reason: the error's type name);
    `selected`, of each finished request whose method the selector chose, with its record.
    The router's own time: `relayed`, per chunk, from its arrival from the worker to the front
    end's write of it to the client; `router_time`, once a request's first token is written,
    the seconds from receiving it to calling its worker (admission) and that first chunk's relay.
    """

    def accepted(self, request_id: str, prompt_tokens: int) -> None: ...

    def first_token(self, request_id: str, ttft_s: float) -> None: ...

    def finished(self, request_id: str, last: RequestOutput | None, tpot_s: float | None,
                 e2e_s: float) -> None: ...

    def failed(self, request_id: str, reason: str) -> None: ...

    def relayed(self, request_id: str, relay_s: float) -> None: ...

    def router_time(self, request_id: str, admission_s: float, first_relay_s: float) -> None: ...

    def selected(self, record: PerfRecord) -> None: ...
