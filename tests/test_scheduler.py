"""The nightly schedule, driven through APScheduler 3 itself with a fake clock and no sleeping.

APScheduler reads the time only with `datetime.now(...)`, in `schedulers/base.py` (due jobs,
the next run time of a new job, the next wakeup) and in `executors/base.py` (the misfire check
when a run starts); `test_fake_clock_covers_every_time_read` keeps that list honest. The
`clock` fixture swaps the `datetime` of those two modules for one whose `now()` is the fake
time. The scheduler's own timer (real seconds on the event loop) is never waited for: a test
sets the time, calls `wakeup()` as the timer would, and awaits the job tasks it started.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import apscheduler
import apscheduler.executors.base
import apscheduler.schedulers.base
import pytest
import sqlalchemy as sa

from core import scheduler as scheduler_module
from core.scheduler import JOB_ID, TABLE, NightlySchedule
from core.settings import Settings, TrainingSettings
from core.store import db

PARIS = ZoneInfo("Europe/Paris")
CLOCK_MODULES = (apscheduler.schedulers.base, apscheduler.executors.base)


def paris(day: int, hour: int, minute: int = 0, month: int = 1) -> datetime:
    """A wall-clock time in Paris in 2025 (January: no DST change nearby)."""
    return datetime(2025, month, day, hour, minute, tzinfo=PARIS)


class FakeClock:
    """The time APScheduler sees; tests set `now`."""

    def __init__(self) -> None:
        self.now = datetime(2025, 1, 1, tzinfo=UTC)


class Job:
    """The nightly callback: records the fake time of each call, may fail or wait for `gate`."""

    def __init__(
        self, clock: FakeClock, *, fail: int = 0, gate: asyncio.Event | None = None
    ) -> None:
        self.clock = clock
        self.calls: list[datetime] = []
        self.fail = fail
        self.gate = gate
        self.cancelled = False

    async def __call__(self) -> object:
        self.calls.append(self.clock.now)
        if self.gate is not None:
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled = True
                raise
        if len(self.calls) <= self.fail:
            raise RuntimeError("out of memory")
        return "trained 2 channels"


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()

    class FakeDatetime(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> Any:
            return fake.now.astimezone(tz)

    for module in CLOCK_MODULES:
        monkeypatch.setattr(module, "datetime", FakeDatetime)
    return fake


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Callable[..., NightlySchedule]]:
    """Schedules on one SQLite file (a restart is a new schedule on it); all stopped at the end."""
    made: list[NightlySchedule] = []
    url = f"sqlite:///{tmp_path / 'data' / 'loracord.db'}"

    def factory(job: Job, **training: Any) -> NightlySchedule:
        values = {"nightly_time": "03:00", "timezone": "Europe/Paris", **training}
        schedule = NightlySchedule(url, TrainingSettings(**values), job)
        made.append(schedule)
        return schedule

    yield factory
    for schedule in made:
        await schedule.shutdown()


@pytest.fixture(autouse=True)
def _logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="core.scheduler")


async def settle() -> None:
    """Let a pending wakeup run, then wait for every job task it started (and their events)."""
    await asyncio.sleep(0)
    me = asyncio.current_task()
    while pending := [t for t in asyncio.all_tasks() if t is not me and not t.done()]:
        await asyncio.wait_for(asyncio.gather(*pending), 5)
    await asyncio.sleep(0)


async def wake(schedule: NightlySchedule, clock: FakeClock, at: datetime) -> None:
    """Move the clock to `at` and wake the scheduler there, as its timer would."""
    clock.now = at
    schedule._scheduler.wakeup()
    await settle()


async def start(schedule: NightlySchedule, clock: FakeClock, at: datetime) -> None:
    clock.now = at
    await schedule.start()
    await settle()


def test_fake_clock_covers_every_time_read() -> None:
    """An APScheduler upgrade reading the time elsewhere would leave it out of the fake clock.
    (The date and interval triggers read it too; the schedule uses neither.)"""
    root = Path(apscheduler.__file__).parent
    readers = {
        path.relative_to(root).as_posix()
        for path in root.rglob("*.py")
        if "datetime.now(" in path.read_text()
    }
    patched = {Path(m.__file__ or "").relative_to(root).as_posix() for m in CLOCK_MODULES}
    assert readers == patched | {"triggers/date.py", "triggers/interval.py"}


async def test_fires_at_the_configured_time_in_its_zone(
    clock: FakeClock, make: Callable[..., NightlySchedule], caplog: pytest.LogCaptureFixture
) -> None:
    job = Job(clock)
    schedule = make(job)
    await start(schedule, clock, paris(1, 1))
    assert schedule.running
    assert schedule.next_run() == paris(1, 3)

    await wake(schedule, clock, paris(1, 2, 59))  # 03:00 in UTC would be 04:00 in Paris
    assert job.calls == []
    await wake(schedule, clock, paris(1, 3))
    await wake(schedule, clock, paris(1, 3, 1))
    assert job.calls == [paris(1, 3)]
    next_run = schedule.next_run()
    assert next_run is not None and next_run.isoformat() == "2025-01-02T03:00:00+01:00"
    assert "nightly training starts" in caplog.text
    assert "nightly training finished: trained 2 channels" in caplog.text


async def test_missed_nights_run_once_at_the_next_start(
    clock: FakeClock, make: Callable[..., NightlySchedule]
) -> None:
    before = Job(clock)
    first = make(before)
    await start(first, clock, paris(1, 1))
    await first.shutdown()
    assert not first.running

    # Down through two nights. Only the latest (day 3, 7 h late) is checked against the
    # 36 h grace: APScheduler coalesces before its misfire check, so day 1 (55 h) does not count.
    after = Job(clock)
    second = make(after)
    await start(second, clock, paris(3, 10))
    assert before.calls == []
    assert after.calls == [paris(3, 10)]
    assert second.next_run() == paris(4, 3)


async def test_a_night_missed_beyond_the_grace_is_logged_not_run(
    clock: FakeClock, make: Callable[..., NightlySchedule], caplog: pytest.LogCaptureFixture
) -> None:
    # A daily job's latest missed night is at most 25 h old (the night the clocks go back):
    # with a grace of 24 h, that night is the one that can be missed for good.
    first = make(Job(clock), misfire_grace_hours=24)
    await start(first, clock, paris(25, 1, month=10))  # next run: 03:00 CEST
    await first.shutdown()

    job = Job(clock)
    second = make(job, misfire_grace_hours=24)
    await start(second, clock, datetime(2025, 10, 26, 1, 30, tzinfo=UTC))  # 02:30 CET, 24.5 h
    assert job.calls == []
    assert (
        "the nightly training of 2025-10-25T03:00:00+02:00 was missed: more than 24 hours late"
        in caplog.text
    )
    assert any(r.levelno == logging.WARNING and "missed" in r.message for r in caplog.records)
    next_run = second.next_run()
    assert next_run is not None and next_run.isoformat() == "2025-10-26T03:00:00+01:00"


async def test_a_run_still_going_is_not_started_twice(
    clock: FakeClock, make: Callable[..., NightlySchedule], caplog: pytest.LogCaptureFixture
) -> None:
    gate = asyncio.Event()
    job = Job(clock, gate=gate)
    schedule = make(job)
    await start(schedule, clock, paris(1, 1))

    clock.now = paris(1, 3)
    schedule._scheduler.wakeup()
    for _ in range(3):  # the wakeup, then the job's first step: it now waits on the gate
        await asyncio.sleep(0)
    assert job.calls == [paris(1, 3)]

    clock.now = paris(2, 3)  # a training that lasts a day
    schedule._scheduler.wakeup()
    await asyncio.sleep(0)
    assert job.calls == [paris(1, 3)]
    assert "nightly training is still running from an earlier night" in caplog.text

    gate.set()
    await settle()
    assert job.calls == [paris(1, 3)]
    assert schedule.next_run() == paris(3, 3)


async def test_shutdown_cancels_a_run_in_progress_and_waits_for_it(
    clock: FakeClock, make: Callable[..., NightlySchedule], caplog: pytest.LogCaptureFixture
) -> None:
    job = Job(clock, gate=asyncio.Event())
    schedule = make(job)
    await start(schedule, clock, paris(1, 1))
    clock.now = paris(1, 3)
    schedule._scheduler.wakeup()
    for _ in range(3):
        await asyncio.sleep(0)
    assert job.calls == [paris(1, 3)]

    await schedule.shutdown()
    assert job.cancelled
    assert not schedule.running
    assert "the nightly training was stopped: the scheduler shut down" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_new_time_replaces_the_stored_one(
    clock: FakeClock, make: Callable[..., NightlySchedule]
) -> None:
    first = make(Job(clock))
    await start(first, clock, paris(1, 1))
    await first.shutdown()

    # Restarted after the old time (03:00) passed: that night is not run, the new time is used.
    job = Job(clock)
    second = make(job, nightly_time="05:30")
    await start(second, clock, paris(1, 4))
    assert job.calls == []
    assert second.next_run() == paris(1, 5, 30)
    await wake(second, clock, paris(1, 5, 30))
    assert job.calls == [paris(1, 5, 30)]
    assert second.next_run() == paris(2, 5, 30)


async def test_nightly_off_schedules_nothing(
    clock: FakeClock, make: Callable[..., NightlySchedule], tmp_path: Path
) -> None:
    first = make(Job(clock))
    await start(first, clock, paris(1, 1))
    await first.shutdown()

    job = Job(clock)
    second = make(job, nightly=False)
    await start(second, clock, paris(1, 4))
    assert second.running
    assert second.next_run() is None
    await wake(second, clock, paris(2, 4))
    assert job.calls == []
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'data' / 'loracord.db'}")
    with engine.connect() as conn:
        assert conn.execute(sa.text(f"SELECT count(*) FROM {TABLE}")).scalar() == 0
    engine.dispose()


async def test_a_failing_run_is_logged_and_the_next_night_still_runs(
    clock: FakeClock, make: Callable[..., NightlySchedule], caplog: pytest.LogCaptureFixture
) -> None:
    job = Job(clock, fail=1)
    schedule = make(job)
    await start(schedule, clock, paris(1, 1))

    await wake(schedule, clock, paris(1, 3))
    assert job.calls == [paris(1, 3)]
    errors = [
        r for r in caplog.records if r.name == "core.scheduler" and r.levelno >= logging.ERROR
    ]
    assert [r.getMessage() for r in errors] == [
        "the nightly training of 2025-01-01T03:00:00+01:00 failed: RuntimeError: out of memory; "
        "the next night is still scheduled"
    ]
    assert schedule.running
    assert schedule.next_run() == paris(2, 3)

    await wake(schedule, clock, paris(2, 3))
    assert job.calls == [paris(1, 3), paris(2, 3)]
    assert "nightly training finished: trained 2 channels" in caplog.text


async def test_one_schedule_per_process(
    clock: FakeClock, make: Callable[..., NightlySchedule]
) -> None:
    first = make(Job(clock))
    await start(first, clock, paris(1, 1))
    second = make(Job(clock))
    with pytest.raises(RuntimeError, match="already running"):
        await second.start()
    await second.shutdown()  # it must not unregister the first one's callback
    assert scheduler_module._callbacks[JOB_ID] == first._run


async def test_a_process_without_a_callback_skips_the_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert await scheduler_module._nightly(JOB_ID) is None
    assert "has no callback" in caplog.text


async def test_from_settings_uses_the_store_database(clock: FakeClock, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    schedule = NightlySchedule.from_settings(settings, Job(clock))
    clock.now = paris(1, 1)
    await schedule.start()
    try:
        assert schedule.next_run() == datetime(2025, 1, 1, 3, tzinfo=UTC)  # the default zone
    finally:
        await schedule.shutdown()
    engine = sa.create_engine(db.default_url(settings.data_dir))
    with engine.connect() as conn:
        assert conn.execute(sa.text(f"SELECT id FROM {TABLE}")).scalars().all() == [JOB_ID]
    engine.dispose()
