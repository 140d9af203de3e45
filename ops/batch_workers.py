"""The batch's own Ray worker actors, for a job with a model and no cluster to send rows to.

Each worker is Baton's `Worker` actor (one engine), placed and specified as a cluster pool's
replicas are (`baton.cluster.pools`), so a batch's workers take the same options as `baton up`'s.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError

from baton.actors.model_source import load_tokenizer, resolve
from baton.actors.worker import Worker
from baton.cluster.config import ClusterConfig, PoolConfig
from baton.cluster.pools import actor_options, worker_spec
from baton.errors import EngineError, WorkerUnavailableError, as_baton_error
from baton.ops.batch_output import Generation
from baton.ops.batch_rows import BatchRow
from baton.outputs import RequestOutput
from baton.prompts import chat_prompt

log = logging.getLogger(__name__)

WORKER_NAME_PREFIX = "baton-batch-"


@dataclass(slots=True)
class _Slot:
    """One worker place: its actor now, how many rows it serves, how often it was replaced."""

    index: int
    pool: PoolConfig
    replica: int
    actor: Any = None
    in_flight: int = 0
    generation: int = 0


class WorkerBackend:
    """Rows run on the job's own worker actors (one engine each), made from `config`'s pools of
    role decode or both. A worker that dies is replaced (at most `max_replacements` times in all),
    and the row it held fails with `WorkerUnavailableError` for the runner to retry.

    Workers are named `baton-batch-<job>-<slot>-<generation>` in the job's namespace, and end with
    the job's driver.
    """

    def __init__(self, config: ClusterConfig, max_replacements: int = 8):
        self.config = config
        self.max_replacements = max_replacements
        self._slots: list[_Slot] = []
        self._replaced = 0
        self._tokenizer: Any = None
        self._model = config.model
        self._name = WORKER_NAME_PREFIX
        self._kv_token = secrets.token_urlsafe(24)

    async def start(self) -> None:
        self._name = f"{WORKER_NAME_PREFIX}{ray.get_runtime_context().get_job_id()}"
        for pool in self.config.pools:
            if pool.role in ("decode", "both"):
                for replica in range(pool.replicas):
                    self._slots.append(_Slot(len(self._slots), pool, replica))
        for slot in self._slots:
            self._launch(slot)
        infos = await asyncio.gather(*(s.actor.info.remote() for s in self._slots))
        for slot, info in zip(self._slots, infos, strict=True):
            log.info("worker %d up (pid %d)", slot.index, info["pid"])
        self._model = infos[0]["model"]
        self._tokenizer = load_tokenizer(resolve(self.config.model))
        log.info("%d workers up with model %s", len(self._slots), self._model)

    def _launch(self, slot: _Slot) -> None:
        spec = worker_spec(self.config, slot.pool, self._kv_token, slot.replica)
        name = f"{self._name}-{slot.index}-{slot.generation}"
        slot.actor = ray.remote(Worker).options(name=name, **actor_options(slot.pool)).remote(spec)

    def _replace(self, slot: _Slot, dead: Any) -> None:
        if slot.actor is not dead:  # another row saw the same death and replaced it already
            return
        if self._replaced >= self.max_replacements:
            raise WorkerUnavailableError(
                f"batch workers died {self._replaced} times; see the job's logs for why (out of "
                "memory?), then rerun the job: it resumes where it stopped")
        self._replaced += 1
        slot.generation += 1
        log.warning("worker %d died; starting a replacement (%d of at most %d)", slot.index,
                    self._replaced, self.max_replacements)
        self._launch(slot)

    async def generate(self, row: BatchRow, request_id: str) -> Generation:
        req = row.request
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            prompt = chat_prompt(self._tokenizer, self._model, prompt)
        slot = min(self._slots, key=lambda s: s.in_flight)
        actor = slot.actor
        slot.in_flight += 1
        last: RequestOutput | None = None
        try:
            stream = actor.generate.options(num_returns="streaming").remote(
                request_id, prompt, req.params)
            async for ref in stream:
                last = await ref
        except RayActorError as exc:
            self._replace(slot, actor)
            raise WorkerUnavailableError(f"the worker serving {request_id} died: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - the engine's own error, wrapped by Ray
            known = as_baton_error(exc)
            if known is None:
                raise
            raise known from None
        finally:
            slot.in_flight -= 1
        if last is None or last.finish_reason == "error":
            raise EngineError(f"the engine failed on {request_id}: "
                              f"{last.error if last else 'no output'}")
        return Generation(last.text, last.finish_reason, last.metrics.num_prompt_tokens,
                          len(last.token_ids), self._model)

    async def close(self) -> None:
        for slot in self._slots:
            ray.kill(slot.actor)
