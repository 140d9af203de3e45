"""A local Ray instance of this process's own, started once more if it misses one of Ray's
startup windows.

Ray gives a new node's raylet a fixed 30 s to register with its GCS (`ray._private.node`, not
configurable) and then raises "The current node timed out during startup"; it waits as long for
the GCS server to write its port file, and then raises "Timed out waiting for file .../gcs_server_
port_...". On a loaded machine (two cores running other work) either can take longer; once the
first start's processes are gone, a second start usually succeeds, which is what a user would do
by hand.
"""

from __future__ import annotations

import logging
from typing import Any

import ray

log = logging.getLogger(__name__)

START_ATTEMPTS = 2
# What Ray's startup timeouts say: the raylet's registration, the GCS server's port file.
_TIMED_OUT = ("timed out during startup", "Timed out waiting for file")


def init_local(**options: Any) -> Any:
    """`ray.init(address="local", **options)` (a fresh instance, never a cluster someone `ray
    start`ed here), tried again once after a startup timeout; returns its context."""
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            return ray.init(address="local", **options)
        except Exception as exc:
            ray.shutdown()  # the failed start's processes
            if not any(s in str(exc) for s in _TIMED_OUT) or attempt == START_ATTEMPTS:
                raise
            log.warning("Ray did not start in time (%s); starting Ray again", exc)
    raise AssertionError("unreachable")
