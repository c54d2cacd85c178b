"""Several processes on one database at once: no quote is lost, and nobody waits forever.

Real processes throughout: `bot.py quotes ...` subprocesses as an operator runs them, and forked
workers that meet at a barrier so their first writes really coincide. Each test runs on SQLite
and (with `LORACORD_TEST_POSTGRES_URL`) on PostgreSQL.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from core.store import ChannelRef, QuoteStore
from core.store import db as store_db

ROOT = Path(__file__).resolve().parents[2]
GENERAL = ChannelRef.console("general")
WORKERS = 4


def _env(tmp_path: Path, db_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORACORD_")}
    env.pop("DISCORD_TOKEN", None)
    env.update(LORACORD_DATA_DIR=str(tmp_path / "data"), LORACORD_DATABASE_URL=db_url)
    env["LORACORD_CONFIG"] = str(tmp_path / "empty.toml")
    (tmp_path / "empty.toml").write_text("")
    return env


def _cli(env: dict[str, str], *args: str, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "bot.py", "quotes", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _texts(db_url: str, ref: ChannelRef = GENERAL) -> list[str]:
    with QuoteStore(db_url) as store:
        return sorted(q.text for q in store.list_quotes(ref))


def test_four_cli_adds_as_the_first_writes_to_a_new_database_keep_every_row(
    tmp_path: Path, db_url: str
) -> None:
    env = _env(tmp_path, db_url)
    expected = [f"said by process {n}" for n in range(WORKERS)]
    # Started together: they race to create the schema, the channel row and their quote.
    procs = [_cli(env, "add", "--channel", "general", text) for text in expected]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    for rc, out, err in results:
        assert rc == 0, err
        assert out.startswith("added quote #") and err == ""
    assert _texts(db_url) == expected


def _first_writes(url: str, barrier: Any, worker: int, rooms: int) -> None:
    with QuoteStore(url, busy_seconds=60) as store:
        barrier.wait()
        for room in range(rooms):
            ref = ChannelRef.console(f"room-{room}")
            store.add(ref, f"worker {worker} in room {room}", source="command", operator=True)


def _run_workers(target: Any, *args: Any) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(WORKERS)
    procs = [
        ctx.Process(target=target, args=(*args[:1], barrier, n, *args[1:])) for n in range(WORKERS)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=180)
    assert [p.exitcode for p in procs] == [0] * WORKERS, "a worker failed: see its stderr"


def test_concurrent_first_writes_to_many_new_channels_lose_nothing(db_url: str) -> None:
    QuoteStore(db_url).open().close()  # the schema first: this test is about channel rows
    rooms = 40
    _run_workers(_first_writes, db_url, rooms)
    with QuoteStore(db_url) as store:
        for room in range(rooms):
            ref = ChannelRef.console(f"room-{room}")
            assert store.count(ref) == WORKERS, ref


def _open(url: str, barrier: Any, worker: int) -> None:
    store = QuoteStore(url)
    barrier.wait()
    store.open().close()


def test_four_processes_opening_a_new_database_at_once_all_succeed(db_url: str) -> None:
    _run_workers(_open, db_url)
    engine = store_db.open_engine(db_url)
    try:
        assert store_db.current_revision(engine) == store_db.head_revision()
    finally:
        engine.dispose()


IMPORTER = """
import sys
from core.store import ChannelRef, NewQuote, QuoteStore

def pause(done, total):
    if done == 500:  # the first batch is staged: let the test write, then go on
        print("staged", flush=True)
        sys.stdin.readline()

with QuoteStore(sys.argv[1]) as store:
    items = [NewQuote(f"imported quote {n}") for n in range(30000)]
    report = store.import_quotes(ChannelRef.console("general"), items, progress=pause)
print(report.added, report.duplicates, flush=True)
"""


def test_quotes_add_succeeds_while_a_30000_quote_import_runs(tmp_path: Path, db_url: str) -> None:
    env = _env(tmp_path, db_url)
    importer = subprocess.Popen(
        [sys.executable, "-c", IMPORTER, db_url],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert importer.stdin is not None and importer.stdout is not None
    try:
        assert importer.stdout.readline() == "staged\n"
        added = _cli(env, "add", "--channel", "general", "said during the import")
        assert added.wait(timeout=120) == 0, added.communicate()[1]
        assert _texts(db_url) == ["said during the import"], "the import is not visible yet"
        importer.stdin.write("go\n")
        importer.stdin.flush()
        assert importer.wait(timeout=300) == 0
        assert importer.stdout.read() == "30000 0\n"
    finally:
        importer.kill()
    texts = _texts(db_url)
    assert len(texts) == 30001 and "said during the import" in texts
