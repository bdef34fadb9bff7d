"""The sidecar's main loop: start up, lease chunks, run their requests on the engine, drain.

All chunks of the replica share one pool of ``concurrency`` engine slots. With ``pipeline=True``
the next chunk is pulled as soon as the current chunk's last request has acquired a slot, so its
requests take slots as the current chunk's tail frees them and the engine stays busy across
chunk boundaries. With ``pipeline=False`` (the baseline) a chunk is written and completed before
the next pull.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from sidecar.control import (
    ControlPlaneClient,
    ControlPlaneError,
    Lease,
    LeaseLost,
    Phase,
    ReleaseReason,
    RequestRejected,
)
from sidecar.engine import EngineClient, EngineNotReady
from sidecar.records import (
    BatchRequest,
    InvalidLine,
    encode_jsonl,
    invalid_line_record,
    parse_chunk,
    prepare_body,
    record_for_result,
)
from sidecar.storage import ChunkStorage, StorageError
from sidecar.telemetry import Telemetry

logger = logging.getLogger(__name__)

StopReason = Literal["lease_lost", "drain"]

# Renewal never runs more often than this, whatever lease_seconds the control plane sets.
MIN_RENEW_INTERVAL_SECONDS = 0.05
# Maximum wait for the metrics snapshot sent before each completion (one engine /metrics read
# and one ingest request).
METRICS_BEFORE_COMPLETION_TIMEOUT = 10.0


class ChunkStopped(Exception):
    """A chunk's work was stopped before it finished: its lease was lost, or the drain timed out."""

    def __init__(self, reason: StopReason) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(eq=False)
class ChunkWork:
    """A held lease and the state of its chunk's work."""

    lease: Lease
    log_ids: dict[str, Any]
    # Set once every request of the chunk has acquired an engine slot, or the chunk ended early.
    dispatched: asyncio.Event = field(default_factory=asyncio.Event)
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    stop_reason: StopReason | None = None
    task: asyncio.Task | None = None
    renewer: asyncio.Task | None = None

    def stop(self, reason: StopReason) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self.stopped.set()


@dataclass
class RunnerStats:
    chunks_completed: int = 0
    chunks_released: int = 0
    chunks_lost: int = 0
    requests_succeeded: int = 0
    requests_failed: int = 0


class Runner:
    def __init__(
        self,
        control: ControlPlaneClient,
        engine: EngineClient,
        storage: ChunkStorage,
        *,
        served_model: str | None = None,
        concurrency: int = 8,
        pipeline: bool = True,
        max_leases: int = 2,
        poll_interval: float = 5.0,
        drain_seconds: float = 90.0,
        engine_ready_timeout: float = 1200.0,
        health_poll_interval: float = 2.0,
        telemetry: Telemetry | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if max_leases < 1:
            raise ValueError(f"max_leases must be at least 1, got {max_leases}")
        self.control = control
        self.engine = engine
        self.storage = storage
        self.served_model = served_model
        self.concurrency = concurrency
        self.pipeline = pipeline
        self.max_leases = max_leases
        self.poll_interval = poll_interval
        self.drain_seconds = drain_seconds
        self.engine_ready_timeout = engine_ready_timeout
        self.health_poll_interval = health_poll_interval
        self.telemetry = telemetry
        self.stats = RunnerStats()
        self.log_ids = {"job_id": control.job_id, "replica_id": control.replica_id}
        self._slots = asyncio.Semaphore(concurrency)
        self._active: set[ChunkWork] = set()
        self._chunk_changed = asyncio.Event()
        self._drain_requested = asyncio.Event()
        self._generating_reported = False

    # Startup and shutdown.

    def request_drain(self) -> None:
        """Start a drain: stop pulling, let held chunks finish, then release what is left.

        Safe to call from a signal handler installed with ``loop.add_signal_handler``.
        """
        if self._drain_requested.is_set():
            logger.info("drain already in progress", extra=self.log_ids)
            return
        logger.info("drain requested", extra=self.log_ids)
        self._drain_requested.set()

    async def run(self) -> int:
        """Run the replica until the job is done, startup fails or a drain ends; return the exit code."""
        outcome = await self._start()
        if outcome == "failed":
            return 1
        if outcome == "drained":
            await self._report("draining")
            return 0
        if self.telemetry is not None:
            await self.telemetry.start()
        try:
            return await self._work()
        finally:
            await self._finish_telemetry()

    async def _send_metrics_before_completion(self, work: Any) -> None:
        """Sends a metrics snapshot that covers the chunk's requests before it is completed.

        The job's last completion starts its teardown, which closes the replicas' metrics, so a
        snapshot sent after it would be rejected and the job's final counters would miss the
        last seconds of work. A slow or failed send only delays the completion by its timeout.
        """
        if self.telemetry is None:
            return
        try:
            await asyncio.wait_for(self.telemetry.tick(), METRICS_BEFORE_COMPLETION_TIMEOUT)
        except TimeoutError:
            logger.warning("metrics snapshot before completion timed out", extra=work.log_ids)
        except Exception as error:  # noqa: BLE001 - metrics must never stop a completion
            logger.warning(
                "metrics snapshot before completion failed",
                extra={**work.log_ids, "error": f"{type(error).__name__}: {error}"},
            )

    async def _finish_telemetry(self) -> None:
        """Send the last metrics and the replica summary, before the replica reports its end."""
        if self.telemetry is not None:
            await self.telemetry.close(dataclasses.asdict(self.stats))

    async def _start(self) -> Literal["ready", "failed", "drained"]:
        await self._report("loading_model")
        try:
            waited = await self._unless_draining(
                self.engine.wait_until_ready(
                    self.engine_ready_timeout, self.health_poll_interval, self.log_ids
                )
            )
        except EngineNotReady as error:
            logger.error("engine startup failed", extra={**self.log_ids, "error": str(error)})
            await self._report("startup_failed", str(error))
            return "failed"
        if waited is _DRAINED:
            return "drained"
        if self.served_model is None:
            try:
                self.served_model = await self.engine.first_model_id()
            except (httpx.HTTPError, ValueError, KeyError, AttributeError) as error:
                reason = f"could not read the served model from GET /v1/models: {error}"
                logger.error("engine startup failed", extra={**self.log_ids, "error": reason})
                await self._report("startup_failed", reason)
                return "failed"
        logger.info("engine serves model", extra={**self.log_ids, "model": self.served_model})
        await self._report("model_ready")
        return "ready"

    async def _work(self) -> int:
        loop_task = asyncio.create_task(self._pull_loop(), name="pull-loop")
        drain_wait = asyncio.create_task(self._drain_requested.wait())
        await asyncio.wait({loop_task, drain_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not self._drain_requested.is_set():
            drain_wait.cancel()
            return loop_task.result()
        await self._drain(loop_task)
        return 0

    async def _drain(self, loop_task: asyncio.Task) -> None:
        """Report draining, wait up to ``drain_seconds`` for held chunks, release the rest."""
        deadline = time.monotonic() + self.drain_seconds
        await self._report("draining")
        await asyncio.wait({loop_task}, timeout=max(0.0, deadline - time.monotonic()))
        if not loop_task.done():
            loop_task.cancel()
        await asyncio.gather(loop_task, return_exceptions=True)
        pending = [work.task for work in self._active if work.task is not None]
        if pending:
            logger.info(
                "waiting for held chunks to finish",
                extra={
                    **self.log_ids,
                    "chunk_ids": sorted(work.lease.chunk_id for work in self._active),
                    "seconds_left": round(max(0.0, deadline - time.monotonic()), 3),
                },
            )
            await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
        unfinished = list(self._active)
        for work in unfinished:
            logger.warning("chunk did not finish before the drain deadline", extra=work.log_ids)
            work.stop("drain")
        await asyncio.gather(
            *(work.task for work in unfinished if work.task is not None), return_exceptions=True
        )
        logger.info("drain finished", extra=self.log_ids)

    # The pull loop.

    async def _pull_loop(self) -> int:
        idle_logged = False
        while not self._drain_requested.is_set():
            while len(self._active) >= self.max_leases:
                await self._wait_for_chunk_change(timeout=None)
                if self._drain_requested.is_set():
                    return 0
            try:
                lease = await self.control.pull()
            except RequestRejected as error:
                retry_after = _retry_after_seconds(error)
                if retry_after is None:
                    logger.error(
                        "pull rejected, stopping after the held chunks finish",
                        extra={
                            **self.log_ids,
                            "status_code": error.status_code,
                            "error": str(error),
                        },
                    )
                    await self._wait_for_held_chunks()
                    return 1
                logger.warning(
                    "pull rejected for now, pulling again later",
                    extra={**self.log_ids, "error": str(error), "retry_in_seconds": retry_after},
                )
                await self._pause(retry_after)
                continue
            except ControlPlaneError as error:
                logger.error(
                    "pull failed, pulling again later",
                    extra={
                        **self.log_ids,
                        "error": str(error),
                        "retry_in_seconds": self.poll_interval,
                    },
                )
                await self._pause(self.poll_interval)
                continue

            if lease is None:
                if self._active:
                    # This replica's own chunks are still running, so the job cannot be done.
                    await self._wait_for_chunk_change(timeout=self.poll_interval)
                    continue
                done = await self._job_done()
                if done:
                    logger.info("all chunks of the job are done", extra=self.log_ids)
                    await self._finish_telemetry()
                    await self._report("replica_complete")
                    return 0
                if not idle_logged:
                    logger.info(
                        "no chunk pending while other replicas hold leases, polling",
                        extra={**self.log_ids, "poll_interval_seconds": self.poll_interval},
                    )
                    idle_logged = True
                await self._pause(self.poll_interval)
                continue

            idle_logged = False
            work = self._start_chunk(lease)
            if self._drain_requested.is_set():
                # A pull that was already in flight when the drain began.
                work.stop("drain")
                return 0
            if not self._generating_reported:
                self._generating_reported = True
                await self._report("generating")
            if self.pipeline:
                await self._unless_draining(work.dispatched.wait())
            else:
                await self._unless_draining(asyncio.shield(work.task))
        return 0

    async def _job_done(self) -> bool:
        try:
            progress = await self.control.progress()
        except ControlPlaneError as error:
            logger.error("progress check failed", extra={**self.log_ids, "error": str(error)})
            return False
        return progress.all_done

    async def _wait_for_held_chunks(self) -> None:
        tasks = [work.task for work in self._active if work.task is not None]
        if tasks:
            await asyncio.wait(tasks)

    async def _wait_for_chunk_change(self, timeout: float | None) -> None:
        """Wait until a held chunk ends, a drain starts or ``timeout`` seconds pass."""
        self._chunk_changed.clear()
        changed = asyncio.create_task(self._chunk_changed.wait())
        try:
            await self._unless_draining(asyncio.wait_for(changed, timeout))
        except TimeoutError:
            pass

    async def _pause(self, seconds: float) -> None:
        """Sleep for ``seconds`` unless a drain starts first."""
        await self._unless_draining(asyncio.sleep(seconds))

    async def _unless_draining(self, awaitable: Awaitable[Any]) -> Any:
        """Await ``awaitable`` but give up (and cancel it) when a drain starts; return _DRAINED then."""
        task = asyncio.ensure_future(awaitable)
        drain_wait = asyncio.create_task(self._drain_requested.wait())
        try:
            await asyncio.wait({task, drain_wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            drain_wait.cancel()
            if not task.done():
                task.cancel()
        if task.cancelled():
            return _DRAINED
        return task.result()

    # One chunk.

    def _start_chunk(self, lease: Lease) -> ChunkWork:
        work = ChunkWork(lease, {**self.log_ids, "chunk_id": lease.chunk_id})
        self._active.add(work)
        work.task = asyncio.create_task(self._run_chunk(work), name=f"chunk-{lease.chunk_id}")
        return work

    async def _run_chunk(self, work: ChunkWork) -> None:
        renewer = asyncio.create_task(self._keep_renewed(work))
        work.renewer = renewer
        try:
            await self._process_chunk(work, renewer)
        except ChunkStopped as stop:
            if stop.reason == "drain":
                await self._release(work, "drain")
            else:
                self.stats.chunks_lost += 1
                logger.warning(
                    "chunk stopped because its lease was lost, output discarded",
                    extra=work.log_ids,
                )
        except Exception as error:
            logger.exception("chunk failed unexpectedly, releasing its lease", extra=work.log_ids)
            await self._release(work, "error", f"sidecar error: {type(error).__name__}: {error}")
        finally:
            renewer.cancel()
            work.dispatched.set()
            self._active.discard(work)
            self._chunk_changed.set()

    async def _process_chunk(self, work: ChunkWork, renewer: asyncio.Task) -> None:
        lease = work.lease
        started = time.monotonic()
        logger.info(
            "chunk leased",
            extra={**work.log_ids, "num_lines": lease.num_lines, "attempt": lease.attempt},
        )
        try:
            data = await self._guarded(
                work,
                self.storage.read_range(
                    lease.input_bucket,
                    lease.input_key,
                    lease.byte_start,
                    lease.byte_end,
                    lease.input_etag,
                    work.log_ids,
                ),
            )
        except StorageError as error:
            logger.error(
                "chunk input could not be read, releasing the lease",
                extra={**work.log_ids, "error": str(error)},
            )
            await self._release(work, "error", str(error))
            return

        items = parse_chunk(data)
        if len(items) != lease.num_lines:
            logger.warning(
                "chunk request count differs from the lease",
                extra={**work.log_ids, "parsed": len(items), "num_lines": lease.num_lines},
            )
        records = await self._guarded(work, self._run_requests(work, items))
        succeeded = sum(1 for record in records if record["error"] is None)
        failed = len(records) - succeeded
        prompt_tokens, generation_tokens = _usage_totals(records)
        self._log_failures(work, records)

        try:
            await self._guarded(
                work,
                self.storage.write(
                    lease.output_bucket, lease.output_key, encode_jsonl(records), work.log_ids
                ),
            )
        except StorageError as error:
            logger.error(
                "chunk output could not be written, releasing the lease",
                extra={**work.log_ids, "error": str(error)},
            )
            await self._release(work, "error", str(error))
            return

        renewer.cancel()
        await self._send_metrics_before_completion(work)
        try:
            result = await self._guarded(
                work,
                self.control.complete(lease, succeeded, failed, prompt_tokens, generation_tokens),
            )
        except RequestRejected as error:
            if error.status_code == 409:
                logger.warning(
                    "completion rejected, the job no longer takes completions",
                    extra={**work.log_ids, "error": str(error)},
                )
                return
            logger.error(
                "completion rejected, releasing the lease",
                extra={**work.log_ids, "error": str(error)},
            )
            await self._release(work, "error", f"completion rejected: {error}")
            return
        except ControlPlaneError as error:
            logger.error(
                "completion failed, releasing the lease",
                extra={**work.log_ids, "error": str(error)},
            )
            await self._release(work, "error", f"completion failed: {error}")
            return

        self.stats.chunks_completed += 1
        self.stats.requests_succeeded += succeeded
        self.stats.requests_failed += failed
        logger.info(
            "chunk completed",
            extra={
                **work.log_ids,
                "status": result.get("status"),
                "requests_succeeded": succeeded,
                "requests_failed": failed,
                "seconds": round(time.monotonic() - started, 3),
                "job_completed_chunks": result.get("completed"),
                "job_total_chunks": result.get("total"),
            },
        )

    async def _run_requests(
        self, work: ChunkWork, items: list[BatchRequest | InvalidLine]
    ) -> list[dict[str, Any]]:
        """Send each request once it acquires an engine slot and return the records in input order."""
        records: list[dict[str, Any] | None] = [None] * len(items)
        tasks: list[asyncio.Task] = []
        try:
            for position, item in enumerate(items):
                if isinstance(item, InvalidLine):
                    records[position] = invalid_line_record(item)
                    continue
                body = prepare_body(
                    item.body, self.served_model or "", work.lease.max_output_tokens
                )
                await self._slots.acquire()
                slot = _Slot(self._slots)
                task = asyncio.create_task(self._send(work, item, body, slot, position, records))
                # A done callback runs even when the task is cancelled before it starts.
                task.add_done_callback(slot.free)
                tasks.append(task)
            work.dispatched.set()
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return [record for record in records if record is not None]

    async def _send(
        self,
        work: ChunkWork,
        request: BatchRequest,
        body: dict[str, Any],
        slot: _Slot,
        position: int,
        records: list[dict[str, Any] | None],
    ) -> None:
        result = await self.engine.create_completion(
            request.url, body, {**work.log_ids, "custom_id": request.custom_id}
        )
        # The engine is done with the request, so the next one may go out while this record is built.
        slot.free()
        records[position] = record_for_result(request.custom_id, result)

    def _log_failures(self, work: ChunkWork, records: list[dict[str, Any]]) -> None:
        """Log one line per error code with its count and one example, not one per request."""
        failures = [record for record in records if record["error"] is not None]
        counts = Counter(record["error"]["code"] for record in failures)
        for code, count in counts.items():
            example = next(record for record in failures if record["error"]["code"] == code)
            logger.warning(
                "requests failed in chunk",
                extra={
                    **work.log_ids,
                    "error_code": code,
                    "count": count,
                    "example_custom_id": example["custom_id"],
                    "example_message": example["error"]["message"][:500],
                },
            )

    async def _guarded(self, work: ChunkWork, awaitable: Awaitable[Any]) -> Any:
        """Await ``awaitable``; if the chunk is stopped first, cancel it and raise ChunkStopped."""
        task = asyncio.ensure_future(awaitable)
        if work.stopped.is_set():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise ChunkStopped(work.stop_reason or "drain")
        stop_wait = asyncio.create_task(work.stopped.wait())
        try:
            await asyncio.wait({task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            stop_wait.cancel()
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ChunkStopped(work.stop_reason or "drain")

    async def _keep_renewed(self, work: ChunkWork) -> None:
        interval = max(work.lease.lease_seconds / 3, MIN_RENEW_INTERVAL_SECONDS)
        # Retries of one renewal end before the next renewal is due.
        policy = dataclasses.replace(self.control.retry, max_elapsed=interval)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.control.renew(work.lease, retry=policy)
            except LeaseLost as error:
                logger.warning(
                    "lease lost, stopping the chunk", extra={**work.log_ids, "error": str(error)}
                )
                work.stop("lease_lost")
                return
            except ControlPlaneError as error:
                logger.error(
                    "lease renewal failed, trying again at the next renewal",
                    extra={**work.log_ids, "error": str(error)},
                )

    async def _release(
        self, work: ChunkWork, reason: ReleaseReason, error: str | None = None
    ) -> None:
        # A renewal racing the release would find the lease gone and log it as lost.
        if work.renewer is not None:
            work.renewer.cancel()
        try:
            await self.control.release(work.lease, reason, error)
        except LeaseLost as lost:
            logger.info(
                "lease was already gone at release",
                extra={**work.log_ids, "reason": reason, "error": str(lost)},
            )
            return
        except ControlPlaneError as failure:
            logger.error(
                "lease release failed, the lease will expire instead",
                extra={**work.log_ids, "reason": reason, "error": str(failure)},
            )
            return
        self.stats.chunks_released += 1
        logger.info("lease released", extra={**work.log_ids, "reason": reason})

    async def _report(self, phase: Phase, reason: str | None = None) -> bool:
        try:
            await self.control.report_phase(phase, reason)
        except ControlPlaneError as error:
            logger.error(
                "phase report failed", extra={**self.log_ids, "phase": phase, "error": str(error)}
            )
            return False
        logger.info("phase reported", extra={**self.log_ids, "phase": phase})
        return True


_DRAINED = object()


def _usage_totals(records: list[dict[str, Any]]) -> tuple[int, int]:
    """Return the prompt and completion tokens that the engine reported for the chunk's records."""
    prompt = generation = 0
    for record in records:
        body = (record.get("response") or {}).get("body")
        usage = body.get("usage") if isinstance(body, dict) else None
        if isinstance(usage, dict):
            prompt += int(usage.get("prompt_tokens") or 0)
            generation += int(usage.get("completion_tokens") or 0)
    return prompt, generation


class _Slot:
    """One acquired unit of the engine-slot semaphore, released at most once."""

    def __init__(self, semaphore: asyncio.Semaphore) -> None:
        self._semaphore = semaphore
        self._held = True

    def free(self, _task: asyncio.Task | None = None) -> None:
        if self._held:
            self._held = False
            self._semaphore.release()


def _retry_after_seconds(error: RequestRejected) -> float | None:
    """Return the wait in seconds that a 409 pull rejection requests after a lost race between replicas."""
    if error.status_code != 409 or not isinstance(error.body, dict):
        return None
    value = error.body.get("retry_after_seconds")
    if isinstance(value, (int, float)) and value >= 0:
        return float(value)
    return None
