"""The training runner's decisions, with the trainer child replaced by one that writes a given
result (the real child is run in tests/test_training_e2e.py): naming, promotion against the
current adapter or the base model, the quality bars, consent (versions trained on a removed
quote are deleted), the lock, the queue, and which channels a night trains."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from core.adapters import BaseShapes
from core.app import App, build
from core.errors import TrainingBusy, TrainingError
from core.settings import TrainingSettings
from core.store import ChannelRef, NewQuote
from core.training.protocol import TrainJob
from core.training.runner import Progress, TrainingRunner, TrainRequest, decide
from tests.adapter_kit import write_adapter
from tests.conftest import make_settings

GENERAL = ChannelRef.console("general")
RANDOM = ChannelRef.console("random")
QUOTES = [f"zorblat quote number {n} glimmers" for n in range(30)]


class FakeChild:
    """Stands in for the trainer process: records each job, writes a real adapter folder and
    reports the losses the test sets."""

    def __init__(self, shapes: BaseShapes) -> None:
        self.shapes = shapes
        self.jobs: list[TrainJob] = []
        self.losses: dict[str, Any] = {}

    async def __call__(
        self, job: TrainJob, folder: Path, progress: Progress, cb: Any
    ) -> dict[str, Any]:
        self.jobs.append(job)
        write_adapter(Path(job.out_dir), self.shapes, seed=len(self.jobs))
        (Path(job.out_dir) / "loss_curve.png").write_bytes(b"\x89PNG fake")
        return {
            "event": "result",
            "train_loss": 1.0,
            "base_loss": 3.0,
            "current_loss": 2.5 if job.current_adapter else None,
            "new_loss": 2.0,
            "general_base_loss": 1.0,
            "general_new_loss": 1.05,
            "eval_examples": len(job.eval),
            "diverged": False,
            "samples": {"prompt": "p", "base": "b", "new": "n"},
            "seconds": 1.0,
            "tokens_per_s": 100.0,
            "out_dir": job.out_dir,
            **self.losses,
        }


@pytest.fixture
async def app(tmp_path: Path, embedded_model_dir: Path) -> AsyncIterator[App]:
    settings = make_settings(tmp_path, quotes={"eval_percent": 30}, training={"steps": 3})
    app = build(settings)
    app.trainer.channels = None  # no engine here: nothing to hot-load
    await app.store.open()
    await app.store.import_quotes(GENERAL, [NewQuote(q) for q in QUOTES])
    await app.store.import_quotes(RANDOM, [NewQuote(q + " (random)") for q in QUOTES])
    yield app
    await app.store.close()


@pytest.fixture
def child(app: App, monkeypatch: pytest.MonkeyPatch) -> FakeChild:
    fake = FakeChild(app.trainer._base()[0])
    monkeypatch.setattr(TrainingRunner, "_child_run", fake.__call__)
    return fake


async def test_a_first_training_names_binds_and_promotes(app: App, child: FakeChild) -> None:
    outcome = await app.trainer.train(TrainRequest(GENERAL, "cli"))
    assert outcome.status == "promoted" and (outcome.adapter, outcome.version) == ("general", "v1")
    assert outcome.current_loss is None and "base model" in (outcome.reason or "")
    job = child.jobs[0]
    assert job.init_adapter is None and job.current_adapter is None
    assert job.recipe.steps == 3 and job.device == "cpu"
    assert {q.quote for q in (*job.train, *job.eval)} == set(QUOTES)
    assert not {q.id for q in job.train} & {q.id for q in job.eval}
    binding = await app.store.binding(GENERAL)
    assert (binding.adapter, binding.source) == ("general", "channel")
    state = await app.store.channel_state(GENERAL)
    assert state.train_adapter == "general" and state.last_trained_at is not None
    meta = app.registry.meta("general", "v1")
    assert meta["quote_ids"] == sorted(q.id for q in job.train)
    assert meta["promotion"]["promoted"] and meta["eval_loss"] == 2.0
    assert "loss_curve.png" in meta["files"] and outcome.curve is not None
    runs = await app.store.runs(GENERAL)
    assert runs[0].status == "promoted" and runs[0].version == "v1"
    # the job (which holds the quotes' text) is gone; the child's log folder stays
    assert not list(app.trainer.runs_dir.glob("run-*/job.json"))


async def test_a_worse_version_is_kept_not_promoted(app: App, child: FakeChild) -> None:
    await app.trainer.train(TrainRequest(GENERAL))
    child.losses = {"new_loss": 2.49}  # the current adapter has 2.5: not 2% better
    outcome = await app.trainer.train(TrainRequest(GENERAL))
    assert outcome.status == "kept" and outcome.version == "v2"
    assert "does not beat the current adapter's 2.500" in (outcome.reason or "")
    assert app.registry.info("general").promoted == "v1"
    job = child.jobs[1]
    # continued from the promoted version, and judged against it
    assert job.init_adapter == job.current_adapter == str(app.registry.version_dir("general", "v1"))
    meta = app.registry.meta("general", "v2")
    assert meta["parent"] == "general@v1" and not meta["promotion"]["promoted"]


async def test_harm_on_general_prompts_or_divergence_is_not_promoted(
    app: App, child: FakeChild
) -> None:
    child.losses = {"general_new_loss": 1.5}
    outcome = await app.trainer.train(TrainRequest(GENERAL))
    assert outcome.status == "kept" and "general chat prompts" in (outcome.reason or "")
    child.losses = {"new_loss": None, "diverged": True}
    outcome = await app.trainer.train(TrainRequest(GENERAL))
    assert outcome.status == "kept" and "diverged" in (outcome.reason or "")
    assert app.registry.info("general").promoted is None
    assert (await app.store.binding(GENERAL)).adapter is None  # never bound to a bad version


def test_decide_needs_enough_held_out_quotes() -> None:
    training = TrainingSettings(min_eval_quotes=3)
    result = {"eval_examples": 2, "base_loss": 3.0, "new_loss": 1.0}
    assert decide(result, training, against_base=True)[0] is False
    result["eval_examples"] = 3
    assert decide(result, training, against_base=True) == (
        True,
        "held-out loss 1.000 beats the base model's 3.000",
    )


async def test_too_few_quotes_fail_before_any_training(app: App, child: FakeChild) -> None:
    few = ChannelRef.console("few")
    await app.store.import_quotes(few, [NewQuote("only"), NewQuote("two")])
    with pytest.raises(TrainingError, match="at least 4 are needed"):
        await app.trainer.train(TrainRequest(few))
    # nothing started: no child, no run, no adapter name taken, the lock free
    assert child.jobs == [] and await app.store.runs(few) == []
    assert (await app.store.channel_state(few)).train_adapter is None
    assert await app.store.training_lock_holder() is None


async def test_a_removed_quote_retrains_from_scratch_and_its_versions_go(
    app: App, child: FakeChild
) -> None:
    await app.trainer.train(TrainRequest(GENERAL))
    await app.trainer.train(TrainRequest(GENERAL))  # v2, kept (not better than v1)
    trained_on = child.jobs[0].train[0]
    removed = await app.store.forget_quote(trained_on.id)
    assert removed.marked_for_retraining == (GENERAL,)
    outcome = await app.trainer.train(TrainRequest(GENERAL))
    job = child.jobs[2]
    # from scratch, judged against the base model, without the removed quote
    assert job.init_adapter is None and job.current_adapter is None
    assert trained_on.id not in {q.id for q in (*job.train, *job.eval)}
    assert outcome.status == "promoted" and outcome.version == "v3"
    assert set(outcome.deleted) == {"v1", "v2"}
    assert app.registry.info("general").versions == ("v3",)
    assert not (await app.store.channel_state(GENERAL)).needs_retrain


async def test_a_second_training_is_refused_while_one_holds_the_lock(
    app: App, child: FakeChild
) -> None:
    assert await app.store.acquire_training_lock("another process", 60.0, RANDOM) is None
    with pytest.raises(TrainingBusy, match="another process is training #random"):
        await app.trainer.train(TrainRequest(GENERAL))
    assert child.jobs == []
    await app.store.release_training_lock("another process")
    assert (await app.trainer.train(TrainRequest(GENERAL))).promoted


async def test_the_queue_refuses_a_channel_twice_and_runs_in_order(
    app: App, child: FakeChild
) -> None:
    first = app.trainer.submit(TrainRequest(GENERAL))
    second = app.trainer.submit(TrainRequest(RANDOM))
    with pytest.raises(TrainingBusy):
        app.trainer.submit(TrainRequest(GENERAL))
    assert [r.channel for r in app.trainer.queued()] == [GENERAL, RANDOM]
    assert (await first).promoted and (await second).promoted
    assert [j.train[0].quote.endswith("(random)") for j in child.jobs] == [False, True]
    await app.trainer.close()


async def test_a_channel_bound_to_another_adapter_trains_that_one_but_not_at_night(
    app: App, child: FakeChild
) -> None:
    await app.trainer.train(TrainRequest(RANDOM))  # makes adapter "random"
    await app.store.bind(GENERAL, "random")
    for channel in (GENERAL, RANDOM):
        await app.store.set_auto_train(channel, True)
    await app.store.mark_retrain(RANDOM, True)
    chosen, skipped = await app.trainer.plan_night()
    assert [(s.server, s.channel) for s in chosen] == [(RANDOM.server, RANDOM.channel)]
    assert skipped == [(GENERAL, "bound to random, not to its own adapter")]
    outcome = await app.trainer.train(TrainRequest(GENERAL))  # explicit: the bound adapter
    assert outcome.adapter == "random"
    await app.store.bind(GENERAL, None)  # the base model, explicitly
    _, skipped = await app.trainer.plan_night()
    assert skipped == [(GENERAL, "bound to the base model, not to its own adapter")]


async def test_a_night_trains_channels_with_enough_new_quotes(app: App, child: FakeChild) -> None:
    for channel in (GENERAL, RANDOM):
        await app.store.set_auto_train(channel, True)
    report = await app.trainer.nightly()
    assert {o.channel for o in report.outcomes} == {GENERAL, RANDOM}
    # nothing new since: both skipped, with the reason
    report = await app.trainer.nightly()
    assert report.outcomes == () and len(report.skipped) == 2
    assert "0 new quote(s) since its last training; 5 needed" in report.skipped[0][1]
    await app.store.import_quotes(GENERAL, [NewQuote(f"fresh zorblat {n}") for n in range(5)])
    report = await app.trainer.nightly()
    assert [o.channel for o in report.outcomes] == [GENERAL]


async def test_a_night_over_budget_leaves_the_rest_for_the_next(
    app: App, child: FakeChild, monkeypatch: pytest.MonkeyPatch
) -> None:
    for channel in (GENERAL, RANDOM):
        await app.store.set_auto_train(channel, True)
    elapsed = [0.0]
    app.trainer.clock = lambda: elapsed[0]

    async def slow_child(runner: TrainingRunner, *args: Any) -> dict[str, Any]:
        elapsed[0] += app.settings.training.night_budget_minutes * 60  # a run fills the night
        return await child(*args)

    monkeypatch.setattr(TrainingRunner, "_child_run", slow_child)
    report = await app.trainer.nightly()
    assert len(report.outcomes) == 1 and report.outcomes[0].promoted
    assert len(report.left_over) == 1
    # the one left over is now the stalest: it goes first next night
    chosen, _ = await app.trainer.plan_night()
    assert ChannelRef(chosen[0].server, chosen[0].channel) == report.left_over[0]


async def test_an_unknown_error_is_one_failed_outcome(app: App, monkeypatch: Any) -> None:
    async def broken(*args: Any) -> dict[str, Any]:
        raise TrainingError("the trainer ran out of memory; lower training.batch_size")

    monkeypatch.setattr(TrainingRunner, "_child_run", broken)
    outcome = await app.trainer.train(TrainRequest(GENERAL))
    assert outcome.status == "failed" and "out of memory" in (outcome.reason or "")
    assert app.registry.list() == [] or app.registry.info("general").versions == ()
    assert await app.store.training_lock_holder() is None


async def test_a_quote_removed_during_the_run_marks_the_channel_for_retraining(
    app: App, child: FakeChild, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def forget_while_training(*args: Any) -> dict[str, Any]:
        result = await child(*args[1:])
        await app.store.forget_quote(child.jobs[-1].train[0].id)
        return result

    monkeypatch.setattr(TrainingRunner, "_child_run", forget_while_training)
    outcome = await app.trainer.train(TrainRequest(GENERAL))
    assert outcome.promoted
    assert (await app.store.channel_state(GENERAL)).needs_retrain


class SlowChannels:
    """A bot's adapters whose hot-load takes a while: the run is cancelled during it."""

    def __init__(self) -> None:
        self.loading = asyncio.Event()
        self.loaded = False

    async def refresh(self, force: bool = False) -> None:
        self.loading.set()
        await asyncio.sleep(0.3)
        self.loaded = True


async def test_a_cancellation_while_the_run_commits_waits_for_it(
    app: App, child: FakeChild
) -> None:
    """The scheduler shutting down as the new version is hot-loaded: the commit finishes (the
    run stays promoted, the version bound and loaded), then the cancellation goes on."""
    channels = SlowChannels()
    app.trainer.channels = channels  # type: ignore[assignment]
    task = asyncio.create_task(app.trainer.train(TrainRequest(GENERAL, "nightly")))
    await asyncio.wait_for(channels.loading.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert channels.loaded
    (run,) = await app.store.runs(GENERAL)
    assert (run.status, run.version) == ("promoted", "v1")
    assert app.registry.info("general").promoted == "v1"
    assert (await app.store.binding(GENERAL)).adapter == "general"
    assert app.trainer.current is None
