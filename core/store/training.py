"""Training in the store: run records, the one-training-at-a-time lock, the channels to train.

The lock is one row in `training_lock`. A process takes it when no row exists or the row's
lease has expired, and renews the lease while it trains; a holder that died (`kill -9`, a lost
machine) stops renewing, and the next taker finds the lease expired. Taking, renewing and
releasing are each one write transaction, so two processes never both hold it: on SQLite the
writers queue (`BEGIN IMMEDIATE`); on PostgreSQL the insert conflicts on the primary key.

A run row is written when the run starts and finished once. A run left `running` by a holder
that died is `interrupted` the next time anyone takes the lock.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from core.store.base import StoreBase, checked, insert_ignoring, to_channel_state
from core.store.records import ChannelRef, ChannelState
from core.store.schema import (
    RUN_STATUSES,
    TRAINING_LOCK,
    channels,
    quotes,
    training_lock,
    training_runs,
)

_BY_CHARS = 32
_REASON_CHARS = 2000


@dataclass(frozen=True)
class LockHolder:
    """Who trains now: the process (`holder`), its run and channel, and when its lease ends."""

    holder: str
    run_id: int | None
    channel: ChannelRef | None
    acquired_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class TrainingRun:
    """One training run as recorded."""

    id: int
    channel: ChannelRef
    adapter: str | None
    version: str | None
    trigger: str
    status: str
    reason: str | None
    requested_by: str | None
    started_at: datetime
    finished_at: datetime | None
    data_as_of: datetime | None
    steps: int | None
    quote_ids: tuple[int, ...]
    base_loss: float | None
    current_loss: float | None
    new_loss: float | None


def _run(row: Row[Any]) -> TrainingRun:
    return TrainingRun(
        id=row.id,
        channel=ChannelRef(row.server, row.channel),
        adapter=row.adapter,
        version=row.version,
        trigger=row.trigger,
        status=row.status,
        reason=row.reason,
        requested_by=row.requested_by,
        started_at=row.started_at,
        finished_at=row.finished_at,
        data_as_of=row.data_as_of,
        steps=row.steps,
        quote_ids=tuple(json.loads(row.quote_ids or "[]")),
        base_loss=row.base_loss,
        current_loss=row.current_loss,
        new_loss=row.new_loss,
    )


def _ids(query: sa.Select[Any], conn: Connection) -> list[int]:
    return [int(i) for i in conn.execute(query).scalars()]


def _holder(row: Row[Any]) -> LockHolder:
    channel = ChannelRef(row.server, row.channel) if row.server and row.channel else None
    return LockHolder(row.holder, row.run_id, channel, row.acquired_at, row.expires_at)


class TrainingMixin(StoreBase):
    """Training runs, the training lock, and which channels the nightly run looks at."""

    # -- the lock --------------------------------------------------------------------------

    def acquire_training_lock(
        self, holder: str, lease_seconds: float, channel: ChannelRef | None = None
    ) -> LockHolder | None:
        """Take the lock for `holder`: None when taken, else who holds it now.

        An expired lease is taken over; its holder's `running` run becomes `interrupted`.
        Taking it again as the same holder renews it.
        """

        def work(conn: Connection) -> LockHolder | None:
            now = self.clock()
            current = conn.execute(
                sa.select(training_lock).where(training_lock.c.name == TRAINING_LOCK)
            ).first()
            if current is not None and current.holder != holder and current.expires_at > now:
                return _holder(current)
            if current is not None:
                if current.holder != holder:
                    self._interrupt(conn, current.holder, now)
                # Only the row read above (expired, or ours): under PostgreSQL's read committed
                # a plain delete would also remove a lock another process took since that read,
                # and both would win. A row taken meanwhile is left; the insert below is then
                # ignored and the read after it names the winner.
                conn.execute(
                    sa.delete(training_lock).where(
                        (training_lock.c.name == TRAINING_LOCK)
                        & (training_lock.c.holder == current.holder)
                        & (training_lock.c.expires_at == current.expires_at)
                    )
                )
            values = {
                "name": TRAINING_LOCK,
                "holder": holder,
                "run_id": None,
                "server": channel.server if channel else None,
                "channel": channel.channel if channel else None,
                "acquired_at": now,
                "expires_at": now + timedelta(seconds=lease_seconds),
            }
            conn.execute(insert_ignoring(conn, training_lock, ("name",)).values(values))
            row = conn.execute(
                sa.select(training_lock).where(training_lock.c.name == TRAINING_LOCK)
            ).one()
            return None if row.holder == holder else _holder(row)

        return self._write(work, "the training lock was not taken")

    def renew_training_lock(self, holder: str, lease_seconds: float) -> bool:
        """Extend `holder`'s lease; False when it no longer holds the lock (it expired and was
        taken over), in which case the caller must stop training."""

        def work(conn: Connection) -> bool:
            result = conn.execute(
                sa.update(training_lock)
                .where((training_lock.c.name == TRAINING_LOCK) & (training_lock.c.holder == holder))
                .values(expires_at=self.clock() + timedelta(seconds=lease_seconds))
            )
            return bool(result.rowcount)

        return self._write(work, "the training lock was not renewed")

    def release_training_lock(self, holder: str) -> None:
        """Give the lock back (nothing happens when `holder` does not hold it)."""
        self._write(
            lambda conn: conn.execute(
                sa.delete(training_lock).where(
                    (training_lock.c.name == TRAINING_LOCK) & (training_lock.c.holder == holder)
                )
            ),
            "the training lock was not released",
        )

    def training_lock_holder(self) -> LockHolder | None:
        """Who holds the lock now (None when free or the lease expired)."""

        def work(conn: Connection) -> LockHolder | None:
            row = conn.execute(
                sa.select(training_lock).where(training_lock.c.name == TRAINING_LOCK)
            ).first()
            return _holder(row) if row is not None and row.expires_at > self.clock() else None

        return self._read(work)

    def _interrupt(self, conn: Connection, holder: str, now: datetime) -> None:
        conn.execute(
            sa.update(training_runs)
            .where((training_runs.c.holder == holder) & (training_runs.c.status == "running"))
            .values(
                status="interrupted",
                finished_at=now,
                reason="the process training it stopped (killed or lost) before it finished",
            )
        )

    # -- runs ------------------------------------------------------------------------------

    def start_run(
        self,
        channel: ChannelRef,
        *,
        holder: str,
        trigger: str,
        adapter: str | None,
        requested_by: str | None = None,
    ) -> TrainingRun:
        """Record a run that starts now under `holder`, which must hold the lock."""
        channel = checked(channel)

        def work(conn: Connection) -> TrainingRun:
            held = conn.execute(
                sa.select(training_lock.c.holder).where(training_lock.c.name == TRAINING_LOCK)
            ).scalar()
            if held != holder:
                raise RuntimeError("start_run needs the training lock")
            run_id = conn.execute(
                sa.insert(training_runs).values(
                    server=channel.server,
                    channel=channel.channel,
                    adapter=adapter,
                    trigger=trigger,
                    status="running",
                    requested_by=requested_by[:_BY_CHARS] if requested_by else None,
                    holder=holder,
                    started_at=self.clock(),
                )
            ).inserted_primary_key
            assert run_id is not None
            run_id = run_id[0]
            conn.execute(
                sa.update(training_lock)
                .where(training_lock.c.name == TRAINING_LOCK)
                .values(run_id=run_id, server=channel.server, channel=channel.channel)
            )
            row = conn.execute(sa.select(training_runs).where(training_runs.c.id == run_id)).one()
            return _run(row)

        return self._write(work, "the training run was not recorded")

    def update_run(self, run_id: int, **values: Any) -> TrainingRun:
        """Change a run's record: `status` (one of `RUN_STATUSES`; any status but `running`
        also sets `finished_at`), `reason`, `adapter`, `version`, `steps`, `data_as_of`,
        `quote_ids` (a sequence), the three losses."""
        allowed = {
            "status",
            "reason",
            "adapter",
            "version",
            "steps",
            "data_as_of",
            "quote_ids",
            "base_loss",
            "current_loss",
            "new_loss",
        }
        unknown = set(values) - allowed
        if unknown:
            raise ValueError(f"unknown run fields: {', '.join(sorted(unknown))}")
        if "status" in values:
            if values["status"] not in RUN_STATUSES:
                raise ValueError(f"unknown run status {values['status']!r}")
            if values["status"] != "running":
                values["finished_at"] = self.clock()
        if "quote_ids" in values:
            values["quote_ids"] = json.dumps(sorted(int(i) for i in values["quote_ids"]))
        if values.get("reason"):
            values["reason"] = str(values["reason"])[:_REASON_CHARS]

        def work(conn: Connection) -> TrainingRun:
            conn.execute(
                sa.update(training_runs).where(training_runs.c.id == run_id).values(values)
            )
            row = conn.execute(sa.select(training_runs).where(training_runs.c.id == run_id)).one()
            return _run(row)

        return self._write(work, f"training run {run_id} was not updated")

    def run(self, run_id: int) -> TrainingRun | None:
        """One run by id."""
        query = sa.select(training_runs).where(training_runs.c.id == run_id)
        row = self._read(lambda conn: conn.execute(query).first())
        return None if row is None else _run(row)

    def runs(
        self, channel: ChannelRef | None = None, *, server: str | None = None, limit: int = 20
    ) -> list[TrainingRun]:
        """The newest runs first: of one channel, one server, or all."""
        query = sa.select(training_runs).order_by(training_runs.c.id.desc()).limit(limit)
        if channel is not None:
            query = query.where(
                (training_runs.c.server == channel.server)
                & (training_runs.c.channel == channel.channel)
            )
        elif server is not None:
            query = query.where(training_runs.c.server == server)
        rows = self._read(lambda conn: conn.execute(query).all())
        return [_run(r) for r in rows]

    # -- channels --------------------------------------------------------------------------

    def set_train_adapter(self, ref: ChannelRef, name: str) -> ChannelState:
        """Record the adapter `ref`'s trainings produce."""
        return self._set_flags(ref, train_adapter=name)

    def channels_training(self, adapter: str) -> list[ChannelRef]:
        """Channels whose trainings produce `adapter`."""
        query = sa.select(channels.c.server, channels.c.channel).where(
            channels.c.train_adapter == adapter
        )
        rows = self._read(lambda conn: conn.execute(query).all())
        return [ChannelRef(r.server, r.channel) for r in rows]

    def auto_train_channels(self) -> list[tuple[ChannelState, int]]:
        """Channels with auto-train on, each with its quotes added since its last training
        (all of them when never trained), never-trained and longest-untrained first."""

        def work(conn: Connection) -> list[tuple[ChannelState, int]]:
            newer = (
                sa.select(sa.func.count())
                .where(
                    (quotes.c.channel_id == channels.c.id)
                    & (
                        channels.c.last_trained_at.is_(None)
                        | (quotes.c.added_at > channels.c.last_trained_at)
                    )
                )
                .scalar_subquery()
            )
            rows = conn.execute(
                sa.select(channels, newer.label("new_quotes"))
                .where(channels.c.auto_train)
                .order_by(
                    channels.c.last_trained_at.is_not(None),
                    channels.c.last_trained_at,
                    channels.c.id,
                )
            ).all()
            return [(to_channel_state(r), int(r.new_quotes)) for r in rows]

        return self._read(work)

    def unchanged_quote_ids(self, ids: Sequence[int], since: datetime) -> set[int]:
        """Those of `ids` still in the store as they were at `since`: the rest were removed
        (forgotten, deleted) or edited after it."""
        wanted = sorted({int(i) for i in ids})
        found: set[int] = set()
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            query = sa.select(quotes.c.id).where(
                quotes.c.id.in_(chunk)
                & (quotes.c.edited_at.is_(None) | (quotes.c.edited_at <= since))
            )
            found.update(self._read(functools.partial(_ids, query)))
        return found
