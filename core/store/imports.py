"""Imports: many quotes at once, all or nothing to the user, without holding the write lock.

A long import written in one transaction would lock every other writer out (a star, a menu save,
`quotes add` in another process) for as long as it runs. Instead the rows are staged in
`import_rows` in short batches under a fresh import id, where nothing reads them, then published
into `quotes` by one INSERT ... SELECT (duplicates skipped by the unique key) that deletes the
staged rows in the same transaction. A failed import discards its staged rows; rows left by a
process that died mid-import are swept by the next import after a day.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from core.errors import EmptyQuote, LoracordError
from core.store.base import insert_ignoring
from core.store.records import ChannelRef, ImportReport, NewQuote, text_key
from core.store.removal import QuoteRemoval
from core.store.schema import import_rows, quotes

log = logging.getLogger(__name__)

BATCH = 500
"""Rows per staging transaction: each holds the write lock for milliseconds."""
_STALE = timedelta(days=1)
NOT_IMPORTED = "nothing was imported"
Progress = Callable[[int, int], None]
_COPIED = ("channel_id", "author_id", "author_name", "text", "text_key", "added_at", "added_by")


class QuoteImport(QuoteRemoval):
    """`import_quotes`: staged batches, published at once."""

    def _rows(
        self, items: Iterable[NewQuote], added_by: str | None
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """Every item cleaned and keyed, before anything is written (a bad one stops it all)."""
        rows: list[dict[str, Any]] = []
        notices: list[str] = []
        now = self.clock()
        for n, item in enumerate(items, 1):
            try:
                body, cut = self._prepare(item.text)
            except EmptyQuote as e:
                raise EmptyQuote(f"quote {n} of the import: {e}; {NOT_IMPORTED}") from e
            notices.extend(f"quote {n}: {c}" for c in cut)
            rows.append(
                {
                    "n": n,
                    "author_id": item.author_id,
                    "author_name": (item.author_name or None) and item.author_name[:200],
                    "text": body,
                    "text_key": text_key(body),
                    "added_at": now,
                    "added_by": added_by,
                    "tags": json.dumps(list(item.tags), ensure_ascii=False) if item.tags else "",
                }
            )
        return rows, notices

    def import_quotes(
        self,
        ref: ChannelRef,
        items: Iterable[NewQuote],
        *,
        added_by: str | None = None,
        progress: Progress | None = None,
    ) -> ImportReport:
        """Add many quotes, all or nothing; duplicates are counted, not added.

        `progress(done, total)` is called after each staged batch. An item with empty text fails
        the whole import: parse files with `core.quotes_import`, which names the line.
        """
        rows, notices = self._rows(items, added_by)
        channel_id = self._write(lambda conn: self._begin_import(conn, ref), NOT_IMPORTED)
        import_id = uuid.uuid4().hex
        try:
            for start in range(0, len(rows), BATCH):
                self._stage(import_id, channel_id, rows[start : start + BATCH])
                if progress is not None:
                    progress(min(start + BATCH, len(rows)), len(rows))
            added = self._write(lambda conn: self._publish(conn, import_id), NOT_IMPORTED)
        except BaseException:
            self._discard(import_id)
            raise
        duplicates = len(rows) - added
        log.info("imported %d quotes into %s (%d duplicates)", added, ref, duplicates)
        return ImportReport(added, duplicates, tuple(notices))

    def _begin_import(self, conn: Connection, ref: ChannelRef) -> int:
        stale = import_rows.c.added_at < self.clock() - _STALE
        conn.execute(sa.delete(import_rows).where(stale))
        return self._channel_id(conn, ref)

    def _stage(self, import_id: str, channel_id: int, batch: list[dict[str, Any]]) -> None:
        staged = [dict(row, import_id=import_id, channel_id=channel_id) for row in batch]
        self._write(lambda conn: conn.execute(sa.insert(import_rows), staged), NOT_IMPORTED)

    def _publish(self, conn: Connection, import_id: str) -> int:
        """Move the staged rows into `quotes` (skipping duplicates); how many were added."""
        mine = import_rows.c.import_id == import_id
        source = sa.select(*(import_rows.c[c] for c in _COPIED), sa.literal("import"))
        publish = insert_ignoring(conn, quotes, ("channel_id", "text_key")).from_select(
            [*_COPIED, "source"], source.where(mine).order_by(import_rows.c.n)
        )
        # RETURNING counts the rows really added on both backends (rowcount is -1 on psycopg).
        added = len(conn.execute(publish.returning(quotes.c.id)).all())
        conn.execute(sa.delete(import_rows).where(mine))
        return added

    def _discard(self, import_id: str) -> None:
        try:
            self._write(
                lambda conn: conn.execute(
                    sa.delete(import_rows).where(import_rows.c.import_id == import_id)
                ),
                "its staged rows stay until the next import sweeps them",
            )
        except LoracordError as e:
            log.warning("could not discard a failed import's rows: %s", e)
