"""Duplicate keys ignore invisible characters: NFKC, no format (zero-width) characters.

Recomputes every quote's `text_key` with the rule of this revision (copied here, so later changes
to the live rule do not change what this migration did). Where two quotes of a channel now have
the same key, the older keeps it and the newer keeps its old key: a migration deletes no quote.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_SPACE = re.compile(r"\s+")


def _key(text: str) -> str:
    folded = unicodedata.normalize("NFKC", text)
    visible = "".join(c for c in folded if unicodedata.category(c) != "Cf")
    normal = _SPACE.sub(" ", visible).strip().casefold()
    return hashlib.sha256(normal.encode("utf-8")).hexdigest()


def upgrade() -> None:
    conn = op.get_bind()
    quotes = sa.table(
        "quotes",
        sa.column("id", sa.Integer),
        sa.column("channel_id", sa.Integer),
        sa.column("text", sa.Text),
        sa.column("text_key", sa.String),
    )
    rows = conn.execute(
        sa.select(quotes.c.id, quotes.c.channel_id, quotes.c.text, quotes.c.text_key).order_by(
            quotes.c.id
        )
    ).all()
    taken = {(r.channel_id, r.text_key) for r in rows}
    for row in rows:
        key = _key(row.text)
        if key == row.text_key or (row.channel_id, key) in taken:
            continue
        conn.execute(sa.update(quotes).where(quotes.c.id == row.id).values(text_key=key))
        taken.discard((row.channel_id, row.text_key))
        taken.add((row.channel_id, key))


def downgrade() -> None:
    pass  # the old keys are a subset of the new rule's duplicates: nothing to undo safely
