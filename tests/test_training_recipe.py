"""The trainer child (`python -m core.training`): data masking, the protocol, and real runs.

The runs train the real embedded model on CPU in a real child process, on quotes in an invented
style (made-up words the base model cannot predict), so that learning shows as a clear drop of
the held-out loss within a few dozen steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from core.adapters import BaseShapes, inspect_adapter
from core.training.data import IGNORE_INDEX, batch_stream, quote_examples
from core.training.protocol import (
    EXIT_CANCELLED,
    EXIT_ERROR,
    EXIT_OK,
    JobError,
    ProtocolError,
    Quote,
    Recipe,
    TrainJob,
    parse_event,
)

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("zorble", "quindle", "snarp", "florp", "wibbet", "grommish", "plindle", "vorb")


def _quote(i: int) -> str:
    a, b, c = WORDS[i % 8], WORDS[(i * 3 + 1) % 8], WORDS[(i * 5 + 2) % 8]
    return f"Zorp zorp! The {a} {b}s the {c}, zorp zorp."


STEPS = 12
TRAIN = tuple(Quote(i, _quote(i), "Zed") for i in range(24))
EVAL = tuple(Quote(100 + i, _quote(i + 24), "Zed") for i in range(6))


def make_job(model_dir: Path, out_dir: Path, **changes: Any) -> TrainJob:
    # Fewer steps at a higher rate than the default recipe: the test needs learning, quickly.
    recipe = changes.pop("recipe", Recipe(steps=STEPS, learning_rate=1e-3))
    return TrainJob(
        model_dir=str(model_dir),
        out_dir=str(out_dir),
        train=TRAIN,
        eval=EVAL,
        recipe=recipe,
        threads=2,
        **changes,
    )


class Child:
    """A trainer child with its progress pipe; stdout and stderr go to a log file."""

    def __init__(self, job: TrainJob | str, folder: Path):
        job_file = folder / "job.json"
        job_file.write_text(job if isinstance(job, str) else job.to_json(), encoding="utf-8")
        read, write = os.pipe()
        self.log = folder / "child.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "core.training",
                    "--job",
                    job_file,
                    "--progress-fd",
                    f"{write}",
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(write,),
            )
        os.close(write)
        self.progress = os.fdopen(read, encoding="utf-8")
        self.lines: list[str] = []

    def events(self) -> Any:
        """Parsed events as they come (every line must be one)."""
        for line in self.progress:
            self.lines.append(line)
            yield parse_event(line)

    def finish(self, timeout: float = 600) -> tuple[int, list[dict[str, Any]]]:
        events = list(self.events())
        return self.process.wait(timeout), events


def _result(events: list[dict[str, Any]]) -> dict[str, Any]:
    assert events[-1]["event"] == "result", events[-1]
    return events[-1]


def test_mask_covers_the_answer_and_its_end_of_turn(embedded_model_dir: Path) -> None:
    """Prompt as served, then the quote's tokens and <|im_end|>; the loss on those only."""
    from transformers import AutoTokenizer

    from core.model.decoding import render
    from core.model.fidelity import serving_messages

    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    prompt = "Say something in this channel's voice."
    quote = "Zorp zorp! The florp wibbets."
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    [made] = quote_examples(tok, "", prompt, [f" {quote} "], {eos}, 256)
    served = render(tok, serving_messages("", prompt))
    answer = [*tok(quote, add_special_tokens=False).input_ids, eos]
    assert made.input_ids == served + answer
    assert made.labels == [IGNORE_INDEX] * len(served) + answer
    assert made.targets == len(answer)
    assert tok.decode(made.input_ids[len(served) :]) == quote + "<|im_end|>"

    # A custom system prompt is rendered as served; cutting keeps the front.
    terse = render(tok, serving_messages("Be terse.", prompt))
    [custom] = quote_examples(tok, "Be terse.", prompt, [quote], {eos}, len(terse) + 3)
    assert tok.decode(terse).startswith("<|im_start|>system\nBe terse.<|im_end|>")
    assert custom.input_ids == terse + answer[:3] and custom.targets == 3
    # A prompt that alone fills max_length leaves no example.
    assert quote_examples(tok, "", prompt, [quote], {eos}, len(served)) == []


def test_batches_cycle_through_the_data_evenly() -> None:
    data = list(range(5))
    stream = batch_stream(data, 4, seed=0)  # type: ignore[arg-type]
    seen = [x for _ in range(5) for x in next(stream)]
    assert sorted(seen) == sorted(data * 4)  # 20 draws: every example 4 times
    assert seen != [x for _ in range(5) for x in next(batch_stream(data, 4, seed=1))]  # type: ignore[arg-type]


def test_job_round_trip_and_one_line_errors(tmp_path: Path) -> None:
    job = make_job(tmp_path / "model", tmp_path / "out", current_adapter="/a")
    assert TrainJob.from_json(job.to_json()) == job
    data = json.loads(job.to_json())
    for change, message in [
        ({"recipe": {**data["recipe"], "steps": "many"}}, "recipe.steps must be int"),
        ({"train": []}, "train holds no quotes"),
        ({"batchsize": 4}, "unknown field batchsize"),
        ({"dtype": "int8"}, "dtype must be"),
        ({"eval": [{"id": 1}]}, "eval[0] needs id, quote and author"),
    ]:
        with pytest.raises(JobError, match=message.replace("[", r"\[").replace("]", r"\]")):
            TrainJob.from_json(json.dumps({**data, **change}))
    with pytest.raises(JobError, match="incomplete"):
        TrainJob.from_json(json.dumps({k: v for k, v in data.items() if k != "out_dir"}))


def test_parse_event_refuses_garbage() -> None:
    assert parse_event('{"event": "phase", "phase": "saving"}\n') == {
        "event": "phase",
        "phase": "saving",
    }
    for line in [
        "Loading weights: 100%",
        "[1, 2]",
        '{"event": "nope"}',
        '{"event": "phase", "phase": "napping"}',
        '{"event": "error"}',
        '{"event": "error", "message": 3}',
        '{"event": "cancelled", "extra": 1}',
        '{"event": "step", "step": 1, "steps": 2, "loss": NaN, "lr": 0, "tokens_per_s": 1, '
        '"eta_s": 1}',
    ]:
        with pytest.raises(ProtocolError):
            parse_event(line)


@pytest.fixture(scope="module")
def trained(
    embedded_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[int, list[dict[str, Any]], Child, Path]:
    """One real training run (12 steps, ~40 s on 2 cores)."""
    folder = tmp_path_factory.mktemp("train")
    child = Child(make_job(embedded_model_dir, folder / "adapter"), folder)
    rc, events = child.finish()
    return rc, events, child, folder / "adapter"


@pytest.mark.slow
def test_a_real_run_learns_and_saves_a_servable_adapter(
    trained: tuple[int, list[dict[str, Any]], Child, Path], embedded_model_dir: Path
) -> None:
    rc, events, child, out_dir = trained
    assert rc == EXIT_OK, child.log.read_text()[-3000:]
    assert all(line.endswith("\n") for line in child.lines)  # whole lines, nothing else
    start, result = events[0], _result(events)
    assert start["event"] == "start"
    assert (start["train_examples"], start["eval_examples"], start["steps"]) == (24, 6, STEPS)
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, STEPS + 1))
    assert all(e["tokens_per_s"] > 0 and e["lr"] > 0 for e in steps)
    phases = [e["phase"] for e in events if e["event"] == "phase"]
    assert phases == ["evaluating", "sampling", "saving"]

    losses = result["losses"]
    assert losses == [e["loss"] for e in steps]
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:3]) / 3, result  # the train loss falls
    assert result["new_loss"] < 0.8 * result["base_loss"], result  # and the held-out loss too
    assert result["current_loss"] is None and not result["diverged"]
    assert result["eval_examples"] == 6 and result["eval_tokens"] > 6 * 10
    assert result["general_base_loss"] > 0 and result["general_new_loss"] > 0
    assert result["samples"]["base"] and result["samples"]["new"]
    assert result["peak_memory_bytes"] > 100 * 2**20 and result["tokens_per_s"] > 0
    assert result["out_dir"] == str(out_dir)

    spec = inspect_adapter(out_dir, BaseShapes.of_model(embedded_model_dir), max_rank=16)
    assert spec is not None
    assert (out_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not out_dir.with_name(out_dir.name + ".tmp").exists()


@pytest.mark.slow
def test_sigterm_cancels_without_leaving_an_adapter(
    embedded_model_dir: Path, tmp_path: Path
) -> None:
    out_dir = tmp_path / "adapter"
    child = Child(make_job(embedded_model_dir, out_dir, recipe=Recipe(steps=200)), tmp_path)
    events = []
    for event in child.events():
        events.append(event)
        if event["event"] == "step":
            child.process.send_signal(signal.SIGTERM)
    assert child.process.wait(60) == EXIT_CANCELLED
    assert events[-1] == {"event": "cancelled"}
    assert len([e for e in events if e["event"] == "step"]) < 5
    assert not out_dir.exists() and not Path(f"{out_dir}.tmp").exists()


def test_a_missing_model_is_one_error_event(tmp_path: Path) -> None:
    job = make_job(tmp_path / "no-model", tmp_path / "adapter")
    rc, events = Child(job, tmp_path).finish(timeout=120)
    assert rc == EXIT_ERROR
    assert len(events) == 1 and events[0]["event"] == "error"
    assert "no-model" in events[0]["message"] and "does not exist" in events[0]["message"]
    assert not (tmp_path / "adapter").exists()


def test_a_bad_job_file_is_one_error_event(tmp_path: Path) -> None:
    data = json.loads(make_job(tmp_path, tmp_path / "adapter").to_json())
    rc, events = Child(json.dumps({**data, "recipe": {"rank": 0}}), tmp_path).finish(120)
    assert rc == EXIT_ERROR
    assert events == [{"event": "error", "message": "recipe.rank must be at least 1"}]


def test_a_quantized_layer_dequantizes_again_for_its_gradient_and_keeps_no_weight() -> None:
    """`DequantizedMatmul` gives the plain product and its input gradient, and autograd keeps
    no weight-sized tensor for the backward pass (it dequantizes again there)."""
    import torch

    from core.training.recipe import DequantizedMatmul

    class Layer:  # what the function reads of a GPTQ layer
        in_features, out_features = 64, 96

        def __init__(self) -> None:
            self.g_idx = torch.zeros(64, dtype=torch.int32)
            self.weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
            self.calls = 0

        def dequantize_weight(self, num_itr: int = 1) -> torch.Tensor:
            self.calls += 1
            return self.weight.clone()

    layer = Layer()
    x = torch.randn(8, 64, requires_grad=True)
    saved: list[int] = []
    # Grad mode on whatever an earlier test in this process set (serving turns it off).
    with (
        torch.enable_grad(),
        torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel()) or t, lambda t: t
        ),
    ):
        out = DequantizedMatmul.apply(x, layer)
        kept = list(saved)
        grad = torch.randn(8, 96)
        out.backward(grad)
    assert all(n < layer.weight.numel() for n in kept)
    torch.testing.assert_close(out.detach(), x.detach() @ layer.weight)
    assert x.grad is not None
    torch.testing.assert_close(x.grad, grad @ layer.weight.t())
    assert layer.calls == 2  # once forward, once backward
