"""Run a batch file through a backend: resume, bounded concurrency, retries, ordered output.

Rows already in the output are skipped (see `batch_output`); the others run `concurrency` at a
time, and their lines are written in input order as they complete. A row may run ahead of the
first unwritten one by at most `window` rows, so a slow row holds back a bounded number of
finished lines (kept in memory) rather than the whole file. Progress (rows done of the total,
errors, tokens/s) goes to the log every `progress_every_s`, so it shows in the Ray job's logs.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baton.errors import (
    BatonError,
    CapacityError,
    ConfigError,
    EngineError,
    WorkerUnavailableError,
)
from baton.ops.batch_backends import Backend
from baton.ops.batch_output import (
    OrderedWriter,
    bad_row_line,
    done_ids,
    error_line,
    success_line,
)
from baton.ops.batch_rows import BadRow, BatchRow, parse_rows

log = logging.getLogger(__name__)

RETRYABLE = (WorkerUnavailableError, CapacityError)


@dataclass(slots=True)
class BatchSettings:
    """How a batch runs; checked on construction."""

    concurrency: int = 16
    max_attempts: int = 3  # per row, when its worker dies or the cluster is full
    retry_delay_s: float = 1.0  # times the attempt number
    progress_every_s: float = 10.0
    window: int | None = None  # None: 4 x concurrency

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.max_attempts < 1:
            raise ConfigError(f"max attempts must be >= 1, got {self.max_attempts}")
        if self.window is None:
            self.window = 4 * self.concurrency
        if self.window < self.concurrency:
            raise ConfigError(f"window ({self.window}) must be >= concurrency "
                              f"({self.concurrency})")


@dataclass(slots=True)
class BatchReport:
    """What one run did: rows in the input, skipped as already done, written now, failed."""

    total: int
    skipped: int
    written: int = 0
    errors: int = 0
    retries: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


def read_input(path: Path) -> list[str]:
    if not path.is_file():
        raise ConfigError(f"batch input {path} does not exist; give the path of a JSONL file "
                          "(on the machine that runs the job)")
    return path.read_text().splitlines()


def pending_rows(rows: list[BatchRow | BadRow], done: Counter[str]) -> list[BatchRow | BadRow]:
    """The rows whose results are not in the output yet, in input order."""
    todo = []
    for row in rows:
        if done[row.custom_id] > 0:
            done[row.custom_id] -= 1
        else:
            todo.append(row)
    return todo


class BatchRunner:
    """One run of one input file into one output file."""

    def __init__(self, input_path: Path, output_path: Path, backend: Backend,
                 settings: BatchSettings | None = None):
        self.input_path = input_path
        self.output_path = output_path
        self.backend = backend
        self.settings = settings or BatchSettings()

    async def run(self) -> BatchReport:
        rows = parse_rows(read_input(self.input_path))
        todo = pending_rows(rows, done_ids(self.output_path))
        report = BatchReport(total=len(rows), skipped=len(rows) - len(todo))
        if report.skipped:
            log.info("resuming: %d of %d rows are already in %s", report.skipped, report.total,
                     self.output_path)
        if not todo:
            log.info("nothing to do: every row of %s is in %s", self.input_path,
                     self.output_path)
            return report
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        await self.backend.start()
        try:
            with open(self.output_path, "a") as f:
                await self._run_rows(todo, OrderedWriter(f), report)
        finally:
            await self.backend.close()
        self._log_progress(report, final=True)
        return report

    async def _run_rows(self, todo: list[BatchRow | BadRow], writer: OrderedWriter,
                        report: BatchReport) -> None:
        window = self.settings.window or self.settings.concurrency
        turn = asyncio.Condition()
        queue: Iterator[tuple[int, BatchRow | BadRow]] = iter(enumerate(todo))
        issued = 0
        start = time.monotonic()
        last_log = start

        def may_issue() -> bool:
            return issued < writer.next_slot + window

        async def lane() -> None:
            nonlocal issued, last_log
            while True:
                async with turn:
                    await turn.wait_for(may_issue)
                    item = next(queue, None)
                    if item is None:
                        return
                    issued += 1
                slot, row = item
                line = await self._line(row, report)
                async with turn:
                    report.written += writer.put(slot, line)
                    turn.notify_all()
                report.elapsed_s = time.monotonic() - start
                if time.monotonic() - last_log >= self.settings.progress_every_s:
                    last_log = time.monotonic()
                    self._log_progress(report)

        await asyncio.gather(*(lane() for _ in range(self.settings.concurrency)))
        report.elapsed_s = time.monotonic() - start

    async def _line(self, row: BatchRow | BadRow, report: BatchReport) -> dict[str, Any]:
        if isinstance(row, BadRow):
            report.errors += 1
            log.info("row %s: %s", row.custom_id, row.message)
            return bad_row_line(row)
        attempts = self.settings.max_attempts
        for attempt in range(1, attempts + 1):
            request_id = f"batch-{uuid.uuid4().hex[:12]}"
            try:
                gen = await self.backend.generate(row, request_id)
            except RETRYABLE as exc:
                if attempt == attempts:
                    report.errors += 1
                    return error_line(row.custom_id, type(exc)(
                        f"{exc.message} (gave up after {attempts} attempts; rerun the job to "
                        "try this row again after removing its line from the output)"))
                report.retries += 1
                log.warning("row %s, attempt %d of %d: %s; retrying", row.custom_id, attempt,
                            attempts, exc.message)
                await asyncio.sleep(self.settings.retry_delay_s * attempt)  # back off
            except BatonError as exc:
                report.errors += 1
                return error_line(row.custom_id, exc)
            except Exception as exc:  # noqa: BLE001 - one row's failure never stops the job
                log.exception("row %s failed", row.custom_id)
                report.errors += 1
                return error_line(row.custom_id, EngineError(f"{type(exc).__name__}: {exc}"))
            else:
                report.completion_tokens += gen.completion_tokens
                return success_line(row, gen)
        raise AssertionError("unreachable: the last attempt returns")

    def _log_progress(self, report: BatchReport, final: bool = False) -> None:
        done = report.skipped + report.written
        log.info("%s %d/%d rows (%.0f%%), %d errors, %d retries, %.1f tokens/s",
                 "finished:" if final else "progress:", done, report.total,
                 100.0 * done / max(report.total, 1), report.errors, report.retries,
                 report.tokens_per_s)
