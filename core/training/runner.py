"""The training runner: a channel's quotes in, a checked and (maybe) promoted version out.

One run, in order:
1. Take the training lock in the store (one training at a time across every process; the lease
   is renewed while the run lasts, so a holder that died loses it within `lease_seconds`).
2. Choose the adapter: the one the channel's trainings produce (recorded on its first run), the
   adapter it is explicitly bound to, or a new one named after the channel.
3. Read the channel's quotes once (train and eval splits) and write the job for the child.
4. Run `python -m core.training` as a child process with its own thread budget; it reports one
   JSON line per step on a pipe of its own (stdout and stderr go to the run's log file).
5. Decide: the new version is promoted only if its held-out loss beats the current adapter's
   (the base model's when there is none, or when the current one was trained on quotes that
   are gone) by `promote_margin`, on at least `min_eval_quotes` held-out quotes, and its loss on
   general chat prompts rose at most `general_tolerance` over the base model's.
6. Publish the version (promoted or kept, with the reason in its `meta.json`), bind the channel
   to it when it had no binding of its own, delete versions trained on quotes removed since,
   and bring a running bot's engine in step (hot-load). Run from the CLI, the bot that runs
   beside it notices the new version within seconds.

A cancelled, crashed or killed run leaves no version: the child writes its folder only at the
very end, and the runner publishes it only after a result line.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from core.adapters import Registry, adapter_name, slugify
from core.channels import BaseModel, ChannelAdapters
from core.errors import AdapterError, TrainingBusy, TrainingError
from core.settings import PROJECT_ROOT, Settings, TrainingSettings
from core.store import AsyncQuoteStore, ChannelRef, ChannelState
from core.training.protocol import ProtocolError, Quote, Recipe, TrainJob, parse_event

log = logging.getLogger(__name__)

Trigger = Literal["manual", "nightly", "cli"]
ProgressCallback = Callable[["Progress"], Awaitable[None] | None]

MIN_TRAIN_QUOTES = 4
"""Fewer training quotes than this teach an adapter nothing worth a run."""
CANCEL_GRACE_SECONDS = 20.0
"""How long a cancelled child may take to stop at a step boundary before it is killed."""
RUNS_FOLDER = "training"
"""data_dir/training/run-<id>/: the job, the child's output while it runs, and its log."""


@dataclass(frozen=True)
class TrainRequest:
    """One channel to train: what asked for it, and an optional human name for the channel
    (a Discord channel's name) to name its first adapter after."""

    channel: ChannelRef
    trigger: Trigger = "manual"
    steps: int | None = None
    by: str | None = None
    title: str | None = None


@dataclass
class Progress:
    """What a running (or waiting) training is doing, for `/train status` and progress bars."""

    request: TrainRequest
    phase: str = "queued"
    run_id: int | None = None
    adapter: str | None = None
    step: int = 0
    steps: int = 0
    loss: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    started: float = field(default_factory=time.monotonic)
    # Set when a cancellation came while the run was committing: the run still finished.
    committed: TrainOutcome | None = None

    def line(self) -> str:
        """One line: `#general: step 12/40, loss 2.31, 410 tokens/s, about 35 s left`."""
        where = str(self.request.channel)
        if self.phase != "training":
            return f"{where}: {self.phase}"
        parts = [f"step {self.step}/{self.steps}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:.0f} tokens/s")
        if self.eta_s is not None:
            parts.append(f"about {_duration(self.eta_s)} left")
        return f"{where}: " + ", ".join(parts)


@dataclass(frozen=True)
class TrainOutcome:
    """How a run ended. `status`: promoted, kept (saved, not promoted: `reason` says why),
    failed or cancelled (nothing saved)."""

    run_id: int
    channel: ChannelRef
    adapter: str | None
    version: str | None
    status: str
    reason: str | None
    trigger: Trigger = "manual"
    base_loss: float | None = None
    current_loss: float | None = None
    new_loss: float | None = None
    general_base_loss: float | None = None
    general_new_loss: float | None = None
    train_loss: float | None = None
    steps: int | None = None
    eval_quotes: int = 0
    train_quotes: int = 0
    samples: dict[str, str] | None = None
    curve: Path | None = None
    seconds: float = 0.0
    tokens_per_s: float | None = None
    deleted: tuple[str, ...] = ()

    @property
    def promoted(self) -> bool:
        return self.status == "promoted"

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["channel"] = str(self.channel)
        data["curve"] = str(self.curve) if self.curve else None
        data["deleted"] = list(self.deleted)
        data["promoted"] = self.promoted
        return data

    def sample_answers(self) -> list[tuple[str, str]]:
        """(who answered, the answer) for the sample prompt: the base model, then the new
        adapter; empty when there is no sample."""
        samples = self.samples or {}
        if not samples.get("prompt"):
            return []
        return [
            (label, samples[key])
            for key, label in (("base", "base model"), ("new", "new adapter"))
            if samples.get(key) is not None
        ]

    def report(self) -> list[str]:
        """The summary's lines, then the sample answers (the base model's and the new
        adapter's, each on one line) and the loss curve's file: what a terminal shows."""
        lines = self.summary().splitlines()
        if prompt := (self.samples or {}).get("prompt"):
            lines.append(f"  asked: {prompt}")
            for label, text in self.sample_answers():
                lines.append(f"  {label}: {' / '.join(text.strip().splitlines())}")
        if self.curve is not None:
            lines.append(f"  loss curve: {self.curve}")
        return lines

    def summary(self) -> str:
        """A few lines for a person: the outcome, then the held-out losses."""
        ref = f"{self.adapter}@{self.version}" if self.version else (self.adapter or "-")
        head = {
            "promoted": f"{self.channel}: {ref} promoted",
            "kept": f"{self.channel}: {ref} saved, not promoted ({self.reason})",
            "failed": f"{self.channel}: training failed: {self.reason}",
            "cancelled": f"{self.channel}: training cancelled; nothing was saved",
        }.get(self.status, f"{self.channel}: {self.status}")
        if self.new_loss is None:
            return head
        current = "none" if self.current_loss is None else f"{self.current_loss:.3f}"
        return (
            f"{head}\nheld-out loss: base {_num(self.base_loss)}, current {current}, "
            f"new {_num(self.new_loss)} ({self.eval_quotes} held-out quotes, "
            f"{self.train_quotes} trained on, {self.steps} steps, {_duration(self.seconds)})"
        )


@dataclass(frozen=True)
class NightReport:
    """What a nightly run did: the outcomes, the channels skipped (with why), and those left
    for the next night when the time budget ran out."""

    outcomes: tuple[TrainOutcome, ...]
    skipped: tuple[tuple[ChannelRef, str], ...]
    left_over: tuple[ChannelRef, ...]

    def summary(self) -> str:
        promoted = sum(o.promoted for o in self.outcomes)
        return (
            f"nightly training: {len(self.outcomes)} trained ({promoted} promoted), "
            f"{len(self.skipped)} skipped, {len(self.left_over)} left for the next night"
        )


def decide(
    result: dict[str, Any], training: TrainingSettings, *, against_base: bool
) -> tuple[bool, str]:
    """Whether a new version is promoted, and why (or why not), from the child's result.

    The reference is the current adapter's held-out loss, or the base model's when the channel
    has no current adapter (`against_base`, also when the current one is being deleted).
    """
    evals = int(result.get("eval_examples") or 0)
    if evals < training.min_eval_quotes:
        return False, _too_few_eval(evals, training)
    if result.get("diverged") or result.get("new_loss") is None:
        return False, "training diverged (the loss was not finite)"
    new = float(result["new_loss"])
    current = result.get("current_loss")
    reference, what = (
        (float(result["base_loss"]), "the base model")
        if against_base or current is None
        else (float(current), "the current adapter")
    )
    bar = reference * (1.0 - training.promote_margin)
    if not new <= bar:  # also refuses NaN
        return False, (
            f"held-out loss {new:.3f} does not beat {what}'s {reference:.3f} by "
            f"{training.promote_margin:.0%}"
        )
    general_base = result.get("general_base_loss")
    general_new = result.get("general_new_loss")
    if general_base is not None and general_new is not None:
        limit = float(general_base) * (1.0 + training.general_tolerance)
        if not float(general_new) <= limit:
            return False, (
                f"loss on general chat prompts rose to {float(general_new):.3f} from the base "
                f"model's {float(general_base):.3f} (at most {training.general_tolerance:.0%} "
                "is allowed)"
            )
    return True, f"held-out loss {new:.3f} beats {what}'s {reference:.3f}"


def _too_few_eval(evals: int, training: TrainingSettings) -> str:
    return (
        f"only {evals} held-out quote(s); at least {training.min_eval_quotes} are needed to "
        "judge a new version (more quotes give more held-out ones)"
    )


def trainer_threads(training: TrainingSettings) -> int:
    """The trainer's CPU threads: the setting, else half the cores (at least one)."""
    if training.threads is not None:
        return training.threads
    return max(1, (os.cpu_count() or 2) // 2)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _duration(seconds: float) -> str:
    whole = max(0, round(seconds))
    if whole < 90:
        return f"{whole} s"
    if whole < 5400:
        return f"{round(whole / 60)} min"
    return f"{whole / 3600:.1f} h"


def _now() -> datetime:
    return datetime.now(UTC)


def _dataset_hash(rows: Sequence[Quote]) -> str:
    digest = hashlib.sha256()
    for row in sorted(rows, key=lambda r: r.id):
        digest.update(json.dumps([row.id, row.quote, row.author]).encode("utf-8"))
    return digest.hexdigest()


def child_env(threads: int | None) -> dict[str, str]:
    """The trainer child's environment: this one, plus its thread count and memory settings."""
    env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        # Buffers of 64 KiB and up come from their own mappings, given back when freed: the
        # CPU trainer's peak stays under the seed recipe's (~150 MiB less), at about half the
        # speed of glibc's default (every activation is a fresh mapping; BENCHMARKS.md).
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


class TrainingRunner:
    """Runs trainings one at a time: now (`train`, the CLI) or queued (`submit`, the bot).

    `channels` is the running bot's (or console's) `ChannelAdapters`, through which a promoted
    version is hot-loaded; None in the CLI. `model_dir` and `base` give the served model's
    folder and its shapes and fingerprint. `namer` maps a channel to a human name for its first
    adapter (the Discord front passes one that looks the channel up).
    """

    def __init__(
        self,
        settings: Settings,
        store: AsyncQuoteStore,
        registry: Registry,
        *,
        model_dir: Callable[[], Path],
        base: Callable[[], BaseModel],
        device: Callable[[], str] = lambda: "cpu",
        channels: ChannelAdapters | None = None,
        namer: Callable[[ChannelRef], str | None] | None = None,
        queue_size: int = 16,
    ) -> None:
        self.settings = settings
        self.training = settings.training
        self.store = store
        self.registry = registry
        self.channels = channels
        self.namer = namer
        self._model_dir = model_dir
        self._base = base
        self._device = device
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self.queue_size = queue_size
        self.clock: Callable[[], float] = time.monotonic  # the night's time budget runs on it
        self.current: Progress | None = None
        self._queue: list[tuple[TrainRequest, asyncio.Future[TrainOutcome], Any]] = []
        self._wake = asyncio.Event()
        self._one = asyncio.Lock()
        self._worker: asyncio.Task[None] | None = None
        self._child: asyncio.subprocess.Process | None = None
        self._cancelled = False
        # Told of every finished run (the Discord front announces nightly results with it).
        self.finished: list[Callable[[TrainOutcome], Awaitable[None]]] = []

    @property
    def runs_dir(self) -> Path:
        return self.settings.data_dir / RUNS_FOLDER

    # -- the bot's queue ---------------------------------------------------------------------
    def start(self) -> None:
        """Start the queue's worker (the bot and the console; the CLI calls `train`)."""
        if self._worker is None:
            self._worker = asyncio.create_task(self._work(), name="loracord-training")

    async def close(self) -> None:
        """Cancel what runs and what waits; the child is stopped (nothing is saved)."""
        for _, future, _ in self._queue:
            if not future.done():
                future.set_exception(TrainingError("the bot is shutting down"))
        self._queue.clear()
        if self._worker is not None:
            await self.cancel()
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None

    def submit(
        self, request: TrainRequest, on_progress: ProgressCallback | None = None
    ) -> asyncio.Future[TrainOutcome]:
        """Queue `request`; the future ends with its outcome. A channel already queued or
        training, or a full queue, raises `TrainingBusy`."""
        busy = [r.channel for r, _, _ in self._queue]
        if self.current is not None:
            busy.append(self.current.request.channel)
        if request.channel in busy:
            raise TrainingBusy(f"{request.channel} is already queued or training")
        if len(self._queue) >= self.queue_size:
            raise TrainingBusy(
                f"the training queue is full ({self.queue_size} channels); try again later"
            )
        future: asyncio.Future[TrainOutcome] = asyncio.get_running_loop().create_future()
        self._queue.append((request, future, on_progress))
        self._wake.set()
        self.start()
        return future

    def queued(self) -> list[TrainRequest]:
        """The requests waiting, in order."""
        return [r for r, _, _ in self._queue]

    async def _work(self) -> None:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            request, future, on_progress = self._queue.pop(0)
            if future.done():
                continue
            try:
                outcome = await self.train(request, on_progress, wait=True)
            except asyncio.CancelledError:
                if not future.done():
                    future.set_exception(TrainingError("the bot is shutting down"))
                raise
            except Exception as e:
                if not isinstance(e, TrainingError):
                    log.exception("training %s failed", request.channel)
                if not future.done():
                    future.set_exception(e)
            else:
                if not future.done():
                    future.set_result(outcome)

    async def cancel(self, channel: ChannelRef | None = None) -> bool:
        """Cancel the running training (of `channel`, when given) or drop it from the queue;
        True when something was cancelled."""
        for item in list(self._queue):
            request, future, _ = item
            if channel is not None and request.channel == channel:
                self._queue.remove(item)
                if not future.done():
                    future.set_exception(TrainingError(f"training of {channel} was cancelled"))
                return True
        if self.current is None or (
            channel is not None and self.current.request.channel != channel
        ):
            return False
        self._cancelled = True
        child = self._child
        if child is not None and child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
        return True

    # -- one run -----------------------------------------------------------------------------
    async def train(
        self,
        request: TrainRequest,
        on_progress: ProgressCallback | None = None,
        *,
        wait: bool = False,
    ) -> TrainOutcome:
        """Train `request.channel` now. Another process training raises `TrainingBusy`
        (`wait`: wait for it instead). Failures end in an outcome `failed` or `cancelled`,
        or `TrainingError` when the run could not start (too few quotes)."""
        # One at a time within this process too: the store's lock lets its holder in again.
        async with self._one:
            progress = Progress(request, phase="waiting for the training lock")
            self.current = progress
            self._cancelled = False
            try:
                await self._lock(progress, on_progress, wait=wait)
                try:
                    return await self._run(progress, on_progress)
                finally:
                    await self.store.release_training_lock(self.holder)
            finally:
                self.current = None

    async def _lock(
        self, progress: Progress, on_progress: ProgressCallback | None, *, wait: bool
    ) -> None:
        while True:
            holder = await self.store.acquire_training_lock(
                self.holder, self.training.lease_seconds, progress.request.channel
            )
            if holder is None:
                return
            what = f"training {holder.channel}" if holder.channel else "training"
            if not wait:
                raise TrainingBusy(
                    f"another process is {what} (one training runs at a time); try again "
                    "when it ends"
                )
            if self._cancelled:
                raise TrainingError(f"training of {progress.request.channel} was cancelled")
            progress.phase = f"waiting: another process is {what}"
            await _notify(on_progress, progress)
            await asyncio.sleep(min(5.0, self.training.lease_seconds / 4))

    async def _run(self, progress: Progress, on_progress: ProgressCallback | None) -> TrainOutcome:
        request = progress.request
        channel = request.channel
        # The data first: a channel that cannot be trained gets no run and no adapter name.
        data = await self._data(channel)
        state = await self.store.channel_state(channel)
        name = await self._adapter_for(request, state)
        progress.adapter = name
        run = await self.store.start_run(
            channel,
            holder=self.holder,
            trigger=request.trigger,
            adapter=name,
            requested_by=request.by,
        )
        progress.run_id = run.id
        folder = self.runs_dir / f"run-{run.id}"
        started = time.monotonic()
        renewer = asyncio.create_task(self._renew(), name="loracord-training-lease")
        self._clean_stale_runs()
        try:
            outcome = await self._train_and_publish(
                run.id, folder, progress, on_progress, state, data
            )
        except TrainingError as e:
            outcome = TrainOutcome(run.id, channel, name, None, "failed", str(e))
        except Exception as e:
            log.exception("training %s failed", channel)
            outcome = TrainOutcome(run.id, channel, name, None, "failed", f"unexpected error: {e}")
        except asyncio.CancelledError:
            if progress.committed is None:
                await self.store.update_run(run.id, status="cancelled", reason="the bot shut down")
            raise
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            _clean_run_folder(folder)
        outcome = replace(outcome, seconds=time.monotonic() - started, trigger=request.trigger)
        if outcome.status in ("failed", "cancelled"):
            await self.store.update_run(run.id, status=outcome.status, reason=outcome.reason)
        log.info("%s", outcome.summary().replace("\n", "; "))
        for listener in self.finished:
            try:
                await listener(outcome)
            except Exception:
                log.warning("a training listener failed", exc_info=True)
        return outcome

    def _clean_stale_runs(self) -> None:
        """Remove what runs that died left (their jobs hold quote text); we hold the lock, so
        no other run is writing there."""
        if self.runs_dir.is_dir():
            for folder in self.runs_dir.glob("run-*"):
                _clean_run_folder(folder)

    async def _renew(self) -> None:
        """Renew the lease while the run lasts; a lost lock (expired and taken over) stops
        the child, so two trainings never run at once."""
        every = self.training.lease_seconds / 3
        while True:
            await asyncio.sleep(every)
            try:
                held = await self.store.renew_training_lock(
                    self.holder, self.training.lease_seconds
                )
            except Exception:
                log.warning("could not renew the training lock", exc_info=True)
                continue
            if not held:
                log.error("the training lock was lost (its lease expired); stopping the training")
                await self.cancel()
                return

    async def _adapter_for(self, request: TrainRequest, state: ChannelState) -> str:
        """The adapter this channel's training produces (see the module docstring)."""
        channel = request.channel
        binding = await self.store.binding(channel)
        bound = binding.adapter if binding.source == "channel" else None
        if bound is not None and bound != state.train_adapter:
            info = await asyncio.to_thread(self._info, bound)
            if info is not None and info.server == channel.server:
                return bound
        if state.train_adapter is not None:
            return state.train_adapter
        title = request.title or (self.namer(channel) if self.namer else None)
        stem = slugify(title or channel.channel)
        for n in range(1, 1000):
            candidate = stem if n == 1 else adapter_name(f"{stem[:58]}-{n}")
            taken = await asyncio.to_thread(self._info, candidate)
            if taken is None and not await self.store.channels_training(candidate):
                await self.store.set_train_adapter(channel, candidate)
                return candidate
        raise TrainingError(f"no free adapter name for {channel} (tried {stem}-2 ... -999)")

    def _info(self, name: str) -> Any:
        try:
            return self.registry.info(name)
        except AdapterError:
            return None

    async def _train_and_publish(
        self,
        run_id: int,
        folder: Path,
        progress: Progress,
        on_progress: ProgressCallback | None,
        state: ChannelState,
        data: tuple[datetime, list[Quote], list[Quote]],
    ) -> TrainOutcome:
        request = progress.request
        channel = request.channel
        name = progress.adapter
        assert name is not None
        progress.phase = "preparing"
        await _notify(on_progress, progress)
        as_of, train_rows, eval_rows = data
        info = await asyncio.to_thread(self._info, name)
        promoted = info.promoted if info is not None else None
        tainted = await self._tainted(name, info)
        retrain = state.needs_retrain or bool(tainted)
        current_dir = None
        if promoted is not None and promoted not in tainted:
            current_dir = self.registry.version_dir(name, promoted)
        init_dir = current_dir if self.training.start_from == "current" and not retrain else None
        steps = request.steps or self.training.steps
        await self.store.update_run(
            run_id,
            steps=steps,
            data_as_of=as_of,
            quote_ids=[r.id for r in train_rows],
        )
        job = self._job(folder, train_rows, eval_rows, steps, init_dir, current_dir)
        result = await self._child_run(job, folder, progress, on_progress)
        if result is None:
            return TrainOutcome(run_id, channel, name, None, "cancelled", "cancelled", steps=steps)
        promote, reason = decide(result, self.training, against_base=current_dir is None)
        progress.phase = "saving"
        await _notify(on_progress, progress)
        meta = {
            "dataset": {"hash": _dataset_hash(train_rows), "size": len(train_rows)},
            "train_loss": result.get("train_loss"),
            "eval_loss": result.get("new_loss"),
            "parent": f"{name}@{promoted}" if init_dir is not None else None,
            "base_loss": result.get("base_loss"),
            "current_loss": result.get("current_loss"),
            "general_base_loss": result.get("general_base_loss"),
            "general_new_loss": result.get("general_new_loss"),
            "eval_size": len(eval_rows),
            "steps": steps,
            "quote_ids": sorted(r.id for r in train_rows),
            "data_as_of": as_of.isoformat(timespec="seconds"),
            "run": run_id,
            "channel": str(channel),
            "promotion": {"promoted": promote, "reason": reason},
            "samples": result.get("samples"),
            "seconds": result.get("seconds"),
            "tokens_per_s": result.get("tokens_per_s"),
        }
        # From here the run commits: publish, bind, record, hot-load. A cancellation (the
        # scheduler or the bot shutting down) waits for it rather than leaving a version
        # published under a run recorded as cancelled.
        commit = asyncio.ensure_future(
            self._commit(
                run_id,
                channel,
                name,
                result,
                promote,
                reason,
                meta,
                tainted,
                train_rows,
                as_of,
                steps,
                len(eval_rows),
            )
        )
        try:
            return await asyncio.shield(commit)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):  # a failed commit stays a cancelled run
                progress.committed = await commit
            raise

    async def _commit(
        self,
        run_id: int,
        channel: ChannelRef,
        name: str,
        result: dict[str, Any],
        promote: bool,
        reason: str,
        meta: dict[str, Any],
        tainted: list[str],
        train_rows: list[Quote],
        as_of: datetime,
        steps: int,
        eval_quotes: int,
    ) -> TrainOutcome:
        shapes, fingerprint = self._base()
        try:
            saved = await asyncio.to_thread(
                self.registry.publish,
                name,
                channel.server,
                Path(result["out_dir"]),
                shapes,
                fingerprint,
                meta=meta,
                promote=promote,
            )
        except AdapterError as e:
            raise TrainingError(f"the trained adapter was refused: {e}") from e
        deleted: list[str] = []
        if tainted:
            deleted = await asyncio.to_thread(
                self.registry.purge, name, tainted, "trained on quotes that were removed"
            )
        if promote:
            binding = await self.store.binding(channel)
            if binding.source != "channel":
                await self.store.bind(channel, name, by="training")
        await self.store.mark_trained(channel, as_of)
        # A quote removed or edited while this run trained on it: the store could not know it
        # was trained on yet, so the next run must retrain without it.
        trained_on = [r.id for r in train_rows]
        if len(await self.store.unchanged_quote_ids(trained_on, as_of)) < len(trained_on):
            await self.store.mark_retrain(channel, True)
            log.info("%s: a quote changed during its training; marked for retraining", channel)
        await self.store.update_run(
            run_id,
            status="promoted" if promote else "kept",
            reason=reason,
            version=saved.version,
            base_loss=result.get("base_loss"),
            current_loss=result.get("current_loss"),
            new_loss=result.get("new_loss"),
        )
        if self.channels is not None:
            # The running bot hot-loads the promoted version now rather than at its next poll.
            try:
                await self.channels.refresh(force=True)
            except Exception:
                log.warning("could not load the new adapter version yet", exc_info=True)
        curve = saved.path / "loss_curve.png"
        return TrainOutcome(
            run_id,
            channel,
            name,
            saved.version,
            "promoted" if promote else "kept",
            reason,
            base_loss=result.get("base_loss"),
            current_loss=result.get("current_loss"),
            new_loss=result.get("new_loss"),
            general_base_loss=result.get("general_base_loss"),
            general_new_loss=result.get("general_new_loss"),
            train_loss=result.get("train_loss"),
            steps=steps,
            eval_quotes=eval_quotes,
            train_quotes=len(train_rows),
            samples=result.get("samples"),
            curve=curve if curve.is_file() else None,
            tokens_per_s=result.get("tokens_per_s"),
            deleted=tuple(deleted),
        )

    async def _data(self, channel: ChannelRef) -> tuple[datetime, list[Quote], list[Quote]]:
        """(as of, train rows, eval rows) of the channel, read once; `TrainingError` when they
        are too few to train on or to judge the result."""
        as_of = _now()
        train_set, eval_set = await self.store.training_data(channel)
        # As the child reads them (the job's own records).
        train_rows = [Quote(q.id, q.text, q.author) for q in train_set]
        eval_rows = [Quote(q.id, q.text, q.author) for q in eval_set]
        if len(train_rows) < MIN_TRAIN_QUOTES:
            raise TrainingError(
                f"{channel} has {len(train_rows)} quote(s) to train on; at least "
                f"{MIN_TRAIN_QUOTES} are needed (save more with ⭐ or /quote add)"
            )
        if len(eval_rows) < self.training.min_eval_quotes:
            # Nothing could be promoted: the run is not worth its minutes.
            raise TrainingError(_too_few_eval(len(eval_rows), self.training))
        return as_of, train_rows, eval_rows

    async def _tainted(self, name: str, info: Any) -> list[str]:
        """Versions of `name` trained on a quote that was removed or edited since."""
        if info is None:
            return []
        tainted: list[str] = []
        for version in info.versions:
            try:
                meta = await asyncio.to_thread(self.registry.meta, name, version)
            except AdapterError:
                continue
            ids = meta.get("quote_ids")
            as_of = meta.get("data_as_of")
            if not isinstance(ids, list) or not isinstance(as_of, str):
                continue  # imported, or trained before runs recorded their quotes
            since = datetime.fromisoformat(as_of)
            kept = await self.store.unchanged_quote_ids(ids, since)
            if len(kept) < len(set(ids)):
                tainted.append(version)
        return tainted

    def _job(
        self,
        folder: Path,
        train_rows: list[Quote],
        eval_rows: list[Quote],
        steps: int,
        init_dir: Path | None,
        current_dir: Path | None,
    ) -> TrainJob:
        t = self.training
        recipe = Recipe(
            **{f.name: getattr(t, f.name) for f in fields(Recipe) if f.name != "steps"},
            steps=steps,
        )
        return TrainJob(
            model_dir=str(self._model_dir()),
            out_dir=str(folder / "adapter"),
            train=tuple(train_rows),
            eval=tuple(eval_rows),
            system_prompt=self.settings.system_prompt,
            prompt=t.prompt,
            init_adapter=str(init_dir) if init_dir else None,
            current_adapter=str(current_dir) if current_dir else None,
            recipe=recipe,
            device="cuda" if self._device() == "cuda" else "cpu",
            dtype="auto",
            threads=trainer_threads(t),
            gpu_memory_fraction=t.gpu_memory_fraction,
            sample_prompt=t.sample_prompt,
        )

    async def _child_run(
        self,
        job: TrainJob,
        folder: Path,
        progress: Progress,
        on_progress: ProgressCallback | None,
    ) -> dict[str, Any] | None:
        """Run the child on `job`; its result event, or None when it was cancelled."""
        folder.mkdir(parents=True, exist_ok=True)
        job_file = folder / "job.json"
        job_file.write_text(job.to_json(), encoding="utf-8")
        read_fd, write_fd = os.pipe()
        env = child_env(job.threads)
        progress.phase = "loading the model"
        await _notify(on_progress, progress)
        with open(folder / "child.log", "ab") as child_log:
            try:
                child = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "core.training",
                    "--job",
                    str(job_file),
                    "--progress-fd",
                    str(write_fd),
                    "--nice",
                    str(self.training.nice),
                    pass_fds=(write_fd,),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=child_log,
                    stderr=child_log,
                    env=env,
                    cwd=str(folder),
                )
            finally:
                os.close(write_fd)
        self._child = child
        if self._cancelled:  # cancelled while it was starting
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
        result: dict[str, Any] | None = None
        error: str | None = None
        cancelled = False
        try:
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader(limit=1 << 22)
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", 0)
            )
            try:
                async for raw in reader:
                    try:
                        event = parse_event(raw.decode("utf-8", "replace"))
                    except ProtocolError as e:
                        log.warning("training %s: %s", progress.request.channel, e)
                        continue
                    kind = event["event"]
                    if kind == "step":
                        progress.phase = "training"
                        progress.step = int(event["step"])
                        progress.steps = int(event["steps"])
                        progress.loss = event.get("loss")
                        progress.tokens_per_s = event.get("tokens_per_s")
                        progress.eta_s = event.get("eta_s")
                        await _notify(on_progress, progress)
                    elif kind == "start":
                        progress.phase = "training"
                        progress.steps = int(event.get("steps") or 0)
                        await _notify(on_progress, progress)
                    elif kind == "phase":
                        progress.phase = str(event.get("phase"))
                        await _notify(on_progress, progress)
                    elif kind == "result":
                        result = event
                    elif kind == "error":
                        error = str(event.get("message") or "the trainer failed")
                    elif kind == "cancelled":
                        cancelled = True
            finally:
                transport.close()
            code = await child.wait()
        except BaseException:
            await _stop(child)
            raise
        finally:
            self._child = None
        if self._cancelled or cancelled:
            return None
        if error is not None:
            raise TrainingError(error)
        if code != 0 or result is None:
            raise TrainingError(
                f"the trainer stopped unexpectedly (exit code {code}); its log is "
                f"{folder / 'child.log'}"
            )
        out = Path(str(result.get("out_dir") or job.out_dir))
        if not out.is_dir():
            raise TrainingError("the trainer reported a result but wrote no adapter")
        result["out_dir"] = str(out)
        return result

    # -- the nightly run ---------------------------------------------------------------------
    async def plan_night(self) -> tuple[list[ChannelState], list[tuple[ChannelRef, str]]]:
        """The channels a nightly run trains (stalest first) and those it skips, with why."""
        chosen: list[ChannelState] = []
        skipped: list[tuple[ChannelRef, str]] = []
        for state, new in await self.store.auto_train_channels():
            channel = ChannelRef(state.server, state.channel)
            binding = await self.store.binding(channel)
            if binding.source == "channel" and (
                binding.adapter is None or binding.adapter != state.train_adapter
            ):
                bound = binding.adapter or "the base model"
                skipped.append((channel, f"bound to {bound}, not to its own adapter"))
            elif not state.needs_retrain and new < self.training.min_new_quotes:
                skipped.append(
                    (
                        channel,
                        f"{new} new quote(s) since its last training; "
                        f"{self.training.min_new_quotes} needed",
                    )
                )
            else:
                chosen.append(state)
        return chosen, skipped

    async def nightly(self) -> NightReport:
        """Train every eligible channel, stalest first, within the night's time budget; the
        channels left over are the stalest of the next night, so they go first then."""
        chosen, skipped = await self.plan_night()
        for channel, reason in skipped:
            log.info("nightly training skips %s: %s", channel, reason)
        budget = self.training.night_budget_minutes * 60.0
        started = self.clock()
        outcomes: list[TrainOutcome] = []
        left: list[ChannelRef] = []
        for state in chosen:
            channel = ChannelRef(state.server, state.channel)
            if self.clock() - started >= budget:
                left.append(channel)
                continue
            try:
                outcomes.append(
                    await self.train(TrainRequest(channel, "nightly", by="schedule"), wait=True)
                )
            except TrainingError as e:
                log.warning("nightly training of %s: %s", channel, e)
                skipped.append((channel, str(e)))
        report = NightReport(tuple(outcomes), tuple(skipped), tuple(left))
        log.info("%s", report.summary())
        return report


async def _notify(callback: ProgressCallback | None, progress: Progress) -> None:
    if callback is None:
        return
    try:
        result = callback(progress)
        if result is not None:
            await result
    except Exception:
        log.warning("a training progress callback failed", exc_info=True)


async def _stop(child: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL after `CANCEL_GRACE_SECONDS`."""
    if child.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        child.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.shield(child.wait()), CANCEL_GRACE_SECONDS)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        await child.wait()


def _clean_run_folder(folder: Path) -> None:
    """Remove the job (it holds quote text) and the child's output; keep the log."""
    for name in ("job.json", "adapter", "adapter.tmp"):
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
