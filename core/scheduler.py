"""The nightly training schedule: one APScheduler 3 cron job, kept in the app's database.

The job lives in a `SQLAlchemyJobStore` (table `apscheduler_jobs`) on the same database as the
quotes, so its next run time survives restarts: a night missed while the bot was down runs once
when it starts again. APScheduler decides that itself: the missed nights are coalesced into the
latest one, which runs if it is at most `misfire_grace_hours` late, else it is logged as missed.

The job store pickles jobs, so the stored job names the module-level `_nightly` by text and
carries only its id; `_nightly` finds the callback that this process registered under that id
(the callback is a closure over the app, which cannot be pickled).

Processes: only the bot runs a schedule; the CLI never starts one. APScheduler 3 does not
coordinate schedulers sharing a job store: two bots on one database may both fire the job. The
training lock in the database (`TrainingSettings.lease_seconds`) lets one of them train; the
other finds the lock taken.

The job store talks to the database from the event loop (APScheduler 3 has no other way): a
read when the scheduler wakes up and a write per fire, once a night.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
    JobEvent,
)
from apscheduler.job import Job
from apscheduler.jobstores.base import JobLookupError
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy.exc import SQLAlchemyError

from core.store import db
from core.store.guard import describe

if TYPE_CHECKING:
    from core.settings import Settings, TrainingSettings

log = logging.getLogger(__name__)

JOB_ID = "loracord-nightly"
TABLE = "apscheduler_jobs"

NightlyJob = Callable[[], Awaitable[object]]

# Job id -> the callback of this process; filled by `NightlySchedule.start`.
_callbacks: dict[str, NightlyJob] = {}


async def _nightly(job_id: str) -> object:
    """What the stored job runs: the callback this process registered under `job_id`."""
    callback = _callbacks.get(job_id)
    if callback is None:
        # The stored job seen by a process that registered nothing (only the bot does).
        log.warning("nightly job %s is due but this process has no callback for it", job_id)
        return None
    log.info("nightly training starts")
    try:
        result = await callback()
    except asyncio.CancelledError:
        # Only the scheduler's shutdown cancels a run. APScheduler would swallow the
        # cancellation anyway, after logging it with a traceback as if the job had crashed.
        log.warning("the nightly training was stopped: the scheduler shut down")
        return None
    log.info("nightly training finished: %s", result)
    return result


class NightlySchedule:
    """The nightly run of `job` at `training.nightly_time` in `training.timezone`.

    `url` is the app's database (`from_settings` picks it as the store does). One schedule per
    process: `start` registers `job` as the callback of the stored job.
    """

    def __init__(self, url: str, training: TrainingSettings, job: NightlyJob) -> None:
        self.training = training
        self._job = job
        self._task: asyncio.Task[Any] | None = None
        self._zone = ZoneInfo(training.timezone)
        # The project's engine: the SQLite busy timeout and WAL, as the store opens it.
        self._engine = db.open_engine(url)
        store = SQLAlchemyJobStore(engine=self._engine, tablename=TABLE)
        self._scheduler = AsyncIOScheduler(jobstores={"default": store}, timezone=self._zone)
        self._scheduler.add_listener(
            self._on_event, EVENT_JOB_ERROR | EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES
        )

    @classmethod
    def from_settings(cls, settings: Settings, job: NightlyJob) -> NightlySchedule:
        """The schedule on the database the settings describe (`database_url` or the SQLite
        file in `data_dir`, as `StoreBase.from_settings` chooses)."""
        url = settings.database_url or db.default_url(settings.data_dir)
        return cls(url, settings.training, job)

    @property
    def running(self) -> bool:
        """Whether the scheduler is started (it holds no job when `nightly` is off)."""
        return bool(self._scheduler.running)

    def next_run(self) -> datetime | None:
        """When the job runs next, in the configured time zone; None when not scheduled.

        A time in the past is a missed night about to run (or be logged as missed)."""
        if not self.running:
            return None
        job = self._scheduler.get_job(JOB_ID)
        return None if job is None else job.next_run_time

    async def start(self) -> None:
        """Start the scheduler with the job as the settings say, or without it (`nightly` off).

        The scheduler starts paused so that the stored job can be read and replaced before any
        due run is looked for; resuming it runs a missed night at once.
        """
        if JOB_ID in _callbacks:
            raise RuntimeError("a nightly schedule is already running in this process")
        _callbacks[JOB_ID] = self._run
        try:
            self._scheduler.start(paused=True)
            self._schedule()
        except BaseException as e:
            await self.shutdown()
            if isinstance(e, SQLAlchemyError):
                where = db.where(self._engine.url)
                raise describe(e, where, "the nightly training was not scheduled") from e
            raise
        self._scheduler.resume()

    async def shutdown(self) -> None:
        """Stop the scheduler. The stored job stays. A nightly run in progress is cancelled,
        and awaited: its clean-up (the training lock, the trainer process) is done when this
        returns, before the app closes the store."""
        if _callbacks.get(JOB_ID) == self._run:
            del _callbacks[JOB_ID]
        if not self.running:
            return
        in_progress = self._task
        self._scheduler.shutdown(wait=False)
        # AsyncIOScheduler shuts down (and cancels the run) in a callback on the event loop.
        while self.running:
            await asyncio.sleep(0)
        if in_progress is not None:
            await asyncio.wait([in_progress])

    async def _run(self) -> object:
        """The registered callback: `job`, remembering its task so that `shutdown` can wait."""
        self._task = asyncio.current_task()
        try:
            return await self._job()
        finally:
            self._task = None

    def _schedule(self) -> None:
        """Add, replace or remove the stored job to match the settings."""
        t = self.training
        if not t.nightly:
            with contextlib.suppress(JobLookupError):
                self._scheduler.remove_job(JOB_ID)
            log.info("nightly training is off (training.nightly)")
            return
        hour, minute = (int(part) for part in t.nightly_time.split(":"))
        trigger = CronTrigger(hour=hour, minute=minute, timezone=self._zone)
        kept: dict[str, Any] = {}
        stored = self._stored_job()
        # add_job(replace_existing=True) computes next_run_time from now and overwrites the
        # stored one, which would drop a night missed while the bot was down. Keep it when the
        # time is unchanged; a new time starts from now.
        if (
            stored is not None
            and stored.next_run_time is not None
            and repr(stored.trigger) == repr(trigger)
        ):
            kept["next_run_time"] = stored.next_run_time
        job = self._scheduler.add_job(
            f"{__name__}:{_nightly.__name__}",
            trigger,
            args=(JOB_ID,),
            id=JOB_ID,
            name="nightly training",
            replace_existing=True,
            coalesce=True,
            max_instances=1,
            misfire_grace_time=round(t.misfire_grace_hours * 3600),
            **kept,
        )
        log.info(
            "nightly training at %s %s; next run %s",
            t.nightly_time,
            t.timezone,
            job.next_run_time.isoformat(),
        )

    def _stored_job(self) -> Job | None:
        """The job as stored by an earlier start, or None (also when it cannot be unpickled,
        e.g. stored by another APScheduler version: it is then replaced)."""
        try:
            job: Job | None = self._scheduler.get_job(JOB_ID)
        except SQLAlchemyError:
            raise
        except Exception:
            log.warning("the stored nightly job cannot be read; it is replaced", exc_info=True)
            return None
        return job

    def _on_event(self, event: JobEvent) -> None:
        """Log what went wrong with a fire: APScheduler's own lines do not say what it means."""
        if event.job_id != JOB_ID:
            return
        code = event.code
        if code == EVENT_JOB_MISSED:
            when = event.scheduled_run_time.astimezone(self._zone).isoformat()
            log.warning(
                "the nightly training of %s was missed: more than %g hours late "
                "(training.misfire_grace_hours); it waits for the next night",
                when,
                self.training.misfire_grace_hours,
            )
        elif code == EVENT_JOB_MAX_INSTANCES:
            log.warning("nightly training is still running from an earlier night: not started")
        else:
            when = event.scheduled_run_time.astimezone(self._zone).isoformat()
            log.error(
                "the nightly training of %s failed: %s: %s; the next night is still scheduled",
                when,
                type(event.exception).__name__,
                event.exception,
            )
