"""Channel -> adapter bindings: which adapter answers in a channel.

A channel resolves to its own row in `adapter_bindings`, else its server's default (the row whose
channel is `*`), else the base model. A row's `adapter` None is the base model set explicitly
(a channel can opt out of its server's default); its `version` None follows the adapter's latest
promoted version, `v3` pins one. A missing row is "not set": `unbind` returns a channel to its
server's default, `clear_server_default` a server to the base model.

Writes are upserts (`INSERT ... ON CONFLICT DO UPDATE`), safe with several processes at once on
either backend. Every write sets the row's `updated_at` and bumps the `adapter_bindings` counter
in `change_counters` in the same transaction, so `bindings_stamp`, which a running bot polls,
changes after every write: a delete, or two writes within one clock tick, included.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Row

from core.errors import InvalidName
from core.names import server_name, shown
from core.store.base import StoreBase, checked
from core.store.records import Binding, BoundChannel, ChannelRef, ChannelState, ServerDefault
from core.store.schema import SERVER_DEFAULT, adapter_bindings, change_counters

BASE = "base"
"""What users type for the base model; never stored as a name (None is)."""
COUNTER = "adapter_bindings"
"""This table's row in `change_counters`."""
NOT_BOUND = "the channel's adapter was not changed"
NOT_DEFAULTED = "the server's default adapter was not changed"
_BY_CHARS = 32

# The registry's rules (`core.adapters.adapter_name`, `adapter_version`), checked here on the
# names as stored (nothing is lowercased or trimmed): ASCII only, as an adapter's name is also a
# folder name on disk; versions as the registry numbers them (v1, v2, ..., no leading zeros).
_ADAPTER = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}", re.ASCII)
_VERSION = re.compile(r"v[1-9][0-9]{0,8}", re.ASCII)


def adapter_checked(name: str | None) -> str | None:
    """`name` if it is an adapter name as stored (None: the base model); one line if not."""
    if name is None:
        return None
    if name == BASE:
        raise InvalidName(f"{BASE!r} is the base model, not an adapter name (pass None for it)")
    if not _ADAPTER.fullmatch(name):
        raise InvalidName(
            f"{shown(name)} is not an adapter name: use 1-64 lowercase letters, digits, '-' and "
            "'_' (starting with a letter or digit)"
        )
    return name


def version_checked(adapter: str | None, version: str | None) -> str | None:
    """`version` if it is a version as stored (`v1`, `v2`, ...; None: the promoted one)."""
    if version is None:
        return None
    if adapter is None:
        raise InvalidName(f"the base model has no versions (got {shown(version)})")
    if not _VERSION.fullmatch(version):
        raise InvalidName(f"{shown(version)} is not an adapter version (v1, v2, ...)")
    return version


def _server_checked(server: str) -> str:
    if server_name(server) != server:
        raise InvalidName(f"{shown(server)} is not a server as stored (a Discord id or 'console')")
    return server


def upsert(
    conn: Connection, table: sa.Table, keys: Iterable[str], values: Mapping[str, Any]
) -> Any:
    """`INSERT ... ON CONFLICT (keys) DO UPDATE SET` the other `values`, on either backend."""
    keys = list(keys)
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    changed = {k: v for k, v in values.items() if k not in keys}
    return (
        insert(table).values(dict(values)).on_conflict_do_update(index_elements=keys, set_=changed)
    )


def _bound(row: Row[Any]) -> BoundChannel:
    channel = None if row.channel == SERVER_DEFAULT else row.channel
    return BoundChannel(
        row.server, channel, row.adapter, row.version, row.updated_at, row.updated_by
    )


class BindingsMixin(StoreBase):
    """Which adapter answers in each channel, and each server's default."""

    # -- writes ----------------------------------------------------------------------------

    def _bump(self, conn: Connection) -> None:
        """Count one more write to the bindings (first, so binding writers queue on one row)."""
        insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
        bump = (
            insert(change_counters)
            .values(name=COUNTER, value=1)
            .on_conflict_do_update(
                index_elements=["name"], set_={"value": change_counters.c.value + 1}
            )
        )
        conn.execute(bump)

    def _put(
        self,
        server: str,
        channel: str,
        adapter: str | None,
        version: str | None,
        by: str | None,
        consequence: str,
    ) -> None:
        adapter = adapter_checked(adapter)
        version = version_checked(adapter, version)
        values = {
            "server": server,
            "channel": channel,
            "adapter": adapter,
            "version": version,
            "updated_at": self.clock(),
            "updated_by": by[:_BY_CHARS] if by else None,
        }

        def work(conn: Connection) -> None:
            self._bump(conn)
            conn.execute(upsert(conn, adapter_bindings, ("server", "channel"), values))

        self._write(work, consequence)

    def _drop(self, server: str, channel: str, consequence: str) -> None:
        where = (adapter_bindings.c.server == server) & (adapter_bindings.c.channel == channel)

        def work(conn: Connection) -> None:
            self._bump(conn)
            conn.execute(sa.delete(adapter_bindings).where(where))

        self._write(work, consequence)

    def bind(
        self,
        ref: ChannelRef,
        adapter: str | None,
        version: str | None = None,
        *,
        by: str | None = None,
    ) -> Binding:
        """Bind the channel to `adapter` (None: the base model, whatever the server's default)
        at `version` (None: its promoted version, as it changes). Replaces the channel's binding;
        `by` (who, e.g. a Discord user id) is kept with it, cut to 32 characters."""
        ref = checked(ref)
        self._put(ref.server, ref.channel, adapter, version, by, NOT_BOUND)
        return Binding(adapter, version, "channel")

    def unbind(self, ref: ChannelRef) -> None:
        """Drop the channel's own binding: it follows its server's default again."""
        ref = checked(ref)
        self._drop(ref.server, ref.channel, NOT_BOUND)

    def set_server_default(
        self,
        server: str,
        adapter: str | None,
        version: str | None = None,
        *,
        by: str | None = None,
    ) -> Binding:
        """The binding of the server's channels that have none of their own."""
        server = _server_checked(server)
        self._put(server, SERVER_DEFAULT, adapter, version, by, NOT_DEFAULTED)
        return Binding(adapter, version, "server")

    def clear_server_default(self, server: str) -> None:
        """Drop the server's default: its channels without a binding answer from the base model."""
        self._drop(_server_checked(server), SERVER_DEFAULT, NOT_DEFAULTED)

    def mark_retrain(self, ref: ChannelRef, on: bool = True) -> ChannelState:
        """Mark the channel for retraining (or clear the mark), e.g. when its adapter no longer
        fits the served base model."""
        return self._set_flags(ref, needs_retrain=on)

    # -- reads -----------------------------------------------------------------------------

    def binding(self, ref: ChannelRef) -> Binding:
        """What the channel is bound to: its own binding, else its server's default, else the
        base model (source `none`)."""
        ref = checked(ref)
        t = adapter_bindings
        query = sa.select(t.c.channel, t.c.adapter, t.c.version).where(
            (t.c.server == ref.server) & t.c.channel.in_([ref.channel, SERVER_DEFAULT])
        )
        rows = {r.channel: r for r in self._read(lambda conn: conn.execute(query).all())}
        if (own := rows.get(ref.channel)) is not None:
            return Binding(own.adapter, own.version, "channel")
        if (default := rows.get(SERVER_DEFAULT)) is not None:
            return Binding(default.adapter, default.version, "server")
        return Binding(None, None, "none")

    def bindings(self, server: str | None = None) -> list[BoundChannel]:
        """Every stored binding (one server's for `server`): per server, its default (channel
        None) first, then its channels."""
        query = sa.select(adapter_bindings)
        if server is not None:
            query = query.where(adapter_bindings.c.server == _server_checked(server))
        found = [_bound(r) for r in self._read(lambda conn: conn.execute(query).all())]
        return sorted(found, key=lambda b: (b.server, b.channel is not None, b.channel or ""))

    def server_defaults(self, server: str | None = None) -> list[ServerDefault]:
        """The servers that have a default binding (only `server`'s, when given)."""
        return [
            ServerDefault(b.server, b.adapter, b.version)
            for b in self.bindings(server)
            if b.channel is None
        ]

    def channels_using(self, adapter: str) -> list[ChannelRef]:
        """The channels bound to `adapter` by their own binding (see `servers_defaulting_to`
        for the servers whose default names it)."""
        t = adapter_bindings
        query = sa.select(t.c.server, t.c.channel).where(
            (t.c.adapter == adapter_checked(adapter)) & (t.c.channel != SERVER_DEFAULT)
        )
        rows = self._read(lambda conn: conn.execute(query).all())
        return [ChannelRef(r.server, r.channel) for r in sorted(rows, key=tuple)]

    def servers_defaulting_to(self, adapter: str) -> list[str]:
        """The servers whose default binding names `adapter`."""
        t = adapter_bindings
        query = sa.select(t.c.server).where(
            (t.c.adapter == adapter_checked(adapter)) & (t.c.channel == SERVER_DEFAULT)
        )
        return sorted(self._read(lambda conn: list(conn.execute(query).scalars())))

    def bindings_stamp(self) -> tuple[int, str]:
        """A cheap value that changes after every binding write, by any process: (writes so far,
        the newest `updated_at` as ISO text, '' when there is no binding). Poll it and compare."""
        writes = sa.select(change_counters.c.value).where(change_counters.c.name == COUNTER)
        newest = sa.select(sa.func.max(adapter_bindings.c.updated_at))
        query = sa.select(writes.scalar_subquery(), newest.scalar_subquery())
        count, at = self._read(lambda conn: conn.execute(query).one())
        return int(count or 0), at.isoformat() if at is not None else ""
