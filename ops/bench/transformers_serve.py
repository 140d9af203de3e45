"""The peer of `baton bench serve`: `transformers serve` in a subprocess, and its streaming client.

The server runs the same local model directory Baton serves (never downloading: the hub is set
offline), in the same dtype, pinned to the same cores with as many threads. Requests go to its
OpenAI `/v1/completions` endpoint as the very prompt text Baton gets as token ids (the chat
template already applied), streamed as server-sent events. It has no `ignore_eos`: each request
asks for `min_new_tokens = max_new_tokens` instead, and its generation config names no EOS token,
which its continuous-batching manager takes as EOS disabled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import aiohttp

from baton.errors import ConfigError, EngineError
from baton.ports import free_port

log = logging.getLogger(__name__)

START_TIMEOUT_S = 180.0
ARCHITECTURES = {"llama": "LlamaForCausalLM"}  # what a GGUF-read config leaves out


@dataclass(slots=True)
class StreamProgress:
    """How far one streamed request got; `token_ids` is what the open-loop client counts."""

    tokens: int = 0
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    # Baton's last chunk: its forward passes that made tokens and the draft tokens it verified.
    forward_passes: int | None = None
    draft_tokens: int = 0
    method: str | None = None  # the acceleration method that served it

    @property
    def token_ids(self) -> range:
        # The open-loop client reads only how many tokens have arrived, not which.
        return range(self.tokens)


def serving_dir(model_dir: Path, scratch: Path) -> Path:
    """`model_dir` itself when its config names the model class; otherwise an overlay in
    `scratch` (links to every file, a config.json with `architectures` added)."""
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("architectures"):
        return model_dir
    arch = ARCHITECTURES.get(config.get("model_type", ""))
    if arch is None:
        raise ConfigError(f"{model_dir}/config.json names no architectures and its model_type "
                          f"{config.get('model_type')!r} has no known class; add one")
    overlay = scratch / model_dir.name
    overlay.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if item.name != "config.json":
            (overlay / item.name).symlink_to(item)
    (overlay / "config.json").write_text(json.dumps({**config, "architectures": [arch]},
                                                    indent=2))
    return overlay


class TransformersServe:
    """`transformers serve` on a free loopback port; `start()` waits until it answers /health.

    Use as a context manager: the server is always stopped on the way out.
    """

    def __init__(self, model_dir: Path, *, dtype: str, cores: Sequence[int],
                 continuous_batching: bool = False):
        self.model_dir = model_dir
        self.dtype = dtype
        self.cores = list(cores)
        self.continuous_batching = continuous_batching
        self.port = free_port()
        self._scratch = Path(tempfile.mkdtemp(prefix="baton-peer-"))
        self.model_id = str(serving_dir(model_dir, self._scratch))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        exe = Path(sys.executable).with_name("transformers")
        if not exe.exists():
            raise ConfigError(f"{exe} is missing: install transformers with its CLI")
        cmd = [str(exe), "serve", self.model_id, "--host", "127.0.0.1", "--port",
               str(self.port), "--device", "cpu", "--dtype", self.dtype, "--log-level", "error"]
        return cmd + (["--continuous-batching"] if self.continuous_batching else [])

    def describe(self) -> dict[str, Any]:
        return {"command": " ".join(self.command()), "cores": self.cores,
                "threads": len(self.cores), "continuous_batching": self.continuous_batching,
                "mode": ("continuous batching (paged attention)" if self.continuous_batching
                         else "one model.generate at a time, its default mode (its continuous "
                              "batching is slower on CPU)"),
                "endpoint": "/v1/completions (stream)", "model_dir": self.model_id,
                "ignore_eos": "min_new_tokens = max_tokens; no EOS token in the request's "
                              "generation config (EOS disabled under continuous batching)"}

    def start(self) -> None:
        threads = str(len(self.cores))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        log_path = self._scratch / "server.log"
        with open(log_path, "wb") as out:
            # In the caller's process group: a signal that stops the benchmark stops it too.
            self._proc = subprocess.Popen(self.command(), env=env, stdin=subprocess.DEVNULL,
                                          stdout=out, stderr=out)
        # Pinned at once, while it still imports: the threads torch starts later inherit it.
        os.sched_setaffinity(self._proc.pid, self.cores)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            with contextlib.suppress(OSError), urlopen(f"{self.url}/health", timeout=2) as r:
                if r.status == 200:
                    return
            time.sleep(0.5)
        tail = self.log_tail()
        self.stop()
        raise EngineError(f"transformers serve did not come up on port {self.port}; its log "
                          f"ends:\n{tail}")

    def log_tail(self, chars: int = 2000) -> str:
        path = self._scratch / "server.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            log.warning("transformers serve had exited (status %s); its log ends:\n%s",
                        self._proc.returncode, self.log_tail())
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        shutil.rmtree(self._scratch, ignore_errors=True)

    def __enter__(self) -> TransformersServe:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def sse_events(lines: AsyncIterable[bytes]) -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of a server-sent event stream, up to `[DONE]` or its end."""
    async for raw in lines:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue  # blank separators, comments, other fields
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def completion_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """A greedy streamed completion of exactly `max_tokens` tokens (EOS not honoured)."""
    gen = {"max_new_tokens": max_tokens, "min_new_tokens": max_tokens, "do_sample": False}
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "temperature": 0.0, "generation_config": json.dumps(gen)}


async def stream_completion(session: aiohttp.ClientSession, url: str,
                            body: dict[str, Any]) -> AsyncIterator[StreamProgress]:
    """POST a streamed completion; yields progress each time more tokens arrived.

    Each text event carries one decoded token; the closing event's usage, when given, sets the
    final count (tokens that decoded to no text arrive there)."""
    progress = StreamProgress()
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise EngineError(f"peer answered {resp.status}: {(await resp.text())[:500]}")
        async for event in sse_events(resp.content):
            if "error" in event:
                raise EngineError(f"peer failed mid-stream: {event['error']}")
            choice = (event.get("choices") or [{}])[0]
            usage = event.get("usage") or {}
            before = progress.tokens
            if choice.get("text"):
                progress.tokens += 1
            if usage:
                progress.tokens = max(progress.tokens, int(usage.get("completion_tokens", 0)))
                progress.prompt_tokens = usage.get("prompt_tokens")
            progress.finish_reason = choice.get("finish_reason") or progress.finish_reason
            if progress.tokens > before or progress.finish_reason:
                yield progress
