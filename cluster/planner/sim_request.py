"""A request as the cluster simulator follows it: where it is, what is left, when its tokens
came."""

from __future__ import annotations

from typing import Any


class SimRequest:
    """One request's progress and timestamps; `todo` is prompt (or recompute) tokens left."""

    __slots__ = ("index", "arrival", "prompt", "output", "left", "ctx", "todo", "first",
                 "finish", "decode", "prefill", "held", "started", "remote", "joined", "ctx0",
                 "end", "gain", "verify")

    def __init__(self, index: int, arrival: float, prompt: int, output: int):
        self.index = index
        self.arrival = arrival
        self.prompt = prompt
        self.output = output
        self.left = output  # tokens still to generate
        self.ctx = 0  # tokens in its KV on the engine that holds it
        self.todo = prompt
        self.first = -1.0  # time of the first token (-1: none yet)
        self.finish = -1.0
        self.decode: Any = None  # the SimEngine that decodes it
        self.prefill: Any = None  # the SimEngine that prefills it remotely (None: local)
        self.held: Any = None  # the prefill worker the router counts it on, until it finishes
        self.started = 0.0
        self.remote = False
        # While decoding, `left` and `ctx` are kept lazily: the engine's step clock at joining,
        # the context then, and the clock value at which the request finishes.
        self.joined = 0
        self.ctx0 = 0
        self.end = 0
        # Per decode step (an acceleration method, as measured): tokens it gains, on average,
        # and tokens the step computes for it (its draft plus one).
        self.gain: float = 1
        self.verify: float = 1
