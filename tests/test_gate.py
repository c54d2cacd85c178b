"""The embedded build's quality gate: the measure of what members get, and builds it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.app import App
from core.errors import ModelError
from core.model import build, calibration, fidelity, gate
from core.model.requests import DEFAULT_SYSTEM_PROMPT
from tests.conftest import cache_beside


def test_measurement_set_is_fixed_varied_and_never_calibrates() -> None:
    prompts = fidelity.eval_prompts()
    counts = {c: sum(p.category == c for p in prompts) for c in fidelity.CATEGORIES}
    assert counts == {"facts": 16, "quotes": 16, "instructions": 16, "smalltalk": 16}
    assert all(p.keys for p in prompts if p.category == "facts")
    texts = {p.text for p in prompts}
    assert len(texts) == 64
    assert not texts & set(fidelity.calibration_prompts())
    quotes, _ = calibration.quote_corpus()
    assert not texts & set(quotes)


def test_looped_needs_the_cap_and_a_repeated_ngram() -> None:
    loop = [1, 2, 3, 4] * 5
    assert fidelity.looped(loop, max_new_tokens=20)
    assert not fidelity.looped(loop[:16], max_new_tokens=20)  # stopped before the cap
    assert not fidelity.looped(list(range(20)), max_new_tokens=20)  # long, not repeating


def test_pack_makes_equal_chunks_without_padding() -> None:
    chunks = calibration.pack([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]], 4)
    assert chunks == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert calibration.pack([[1, 2]], 4) == [[1, 2]]


async def test_served_build_answers_like_fp32(
    session_app: App, dequantized_model_dir: Path, record_property: pytest.RecordProperty
) -> None:
    """The measure on the model as this machine serves it, not one lucky answer."""
    reference, tokenizer = gate.load_reference(dequantized_model_dir)
    served = await session_app.engine.run_on_model(lambda model, _tokenizer: model)
    result = gate.check(
        dequantized_model_dir,
        served,
        reference,
        tokenizer,
        session_app.settings.system_prompt,
    )
    record_property("gate", result.as_dict())
    print(result.summary())
    assert result.fidelity.top1_agreement >= gate.MIN_TOP1_AGREEMENT, result.summary()
    assert result.perplexity_ratio <= gate.MAX_PERPLEXITY_RATIO, result.summary()
    assert result.fidelity.scored_tokens > 64 * 8
    assert result.passed


def test_build_records_its_gate(embedded_model_dir: Path) -> None:
    manifest = json.loads((embedded_model_dir / "loracord-build.json").read_text())
    assert manifest["gate"]["passed"] is True
    assert manifest["gate"]["top1_agreement"] >= gate.MIN_TOP1_AGREEMENT
    assert manifest["recipe"]["method"] == "q4_1"
    assert manifest["weights_sha256"] and len(manifest["weights_sha256"]) == 64


@pytest.mark.slow
def test_gate_refuses_a_quote_only_build(
    dequantized_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quotes alone keep quote perplexity but break chat: the gate must not cache it."""
    cache = cache_beside(dequantized_model_dir, tmp_path)
    # The recipe loracord shipped before the gate: quotes only, symmetric, group size 32.
    quotes_only = build.Recipe(calibration="quotes", sym=True, group_size=32, damp_percent=0.05)
    monkeypatch.setattr(build, "recipes", lambda: (quotes_only,))
    with pytest.raises(ModelError) as refused:
        build.ensure_embedded(cache)
    message = str(refused.value)
    assert "could not be built to quality" in message and "\n" not in message
    assert "top-1 agreement" in message
    left = sorted(p.name for p in (cache / "models").iterdir())
    failure = build._failure_file(cache, (quotes_only,)).name
    assert left == sorted([".build.lock", build.dequantized_dir(cache).name, failure])
    # A later start does not spend minutes failing again; it says the same at once.
    with pytest.raises(ModelError, match="could not be built to quality") as again:
        build.ensure_embedded(cache)
    assert str(again.value) == message


def test_a_killed_build_leaves_nothing_for_the_next(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "models" / ".tmp-killed").mkdir(parents=True)
    (cache / "models" / ".tmp-killed" / "model.safetensors").write_bytes(b"half")
    build._remove_leftovers(cache)
    assert not (cache / "models" / ".tmp-killed").exists()


def test_default_system_prompt_is_the_models_own() -> None:
    from tests.conftest import make_settings

    settings = make_settings(Path("/nonexistent"))
    assert settings.system_prompt == DEFAULT_SYSTEM_PROMPT
    assert fidelity.serving_messages(DEFAULT_SYSTEM_PROMPT, "hi")[0].role == "user"


def test_the_fp32_serving_path_answers_like_fp32_too(
    dequantized_model_dir: Path, embedded_model_dir: Path
) -> None:
    """CPUs without bf16 serve in fp32 through another kernel; it must agree as well (GPTQModel's
    torch_fused ignores asymmetric zero points and agreed on 0% of tokens)."""
    from core.model.kernels import choose_runtime
    from core.model.loader import load_for_serving

    reference, tokenizer = gate.load_reference(dequantized_model_dir)
    candidate, _, _ = load_for_serving(embedded_model_dir, choose_runtime("cpu", "float32"))
    prompts = fidelity.render_prompts(
        tokenizer, DEFAULT_SYSTEM_PROMPT, [p.text for p in fidelity.eval_prompts()]
    )
    answers = gate.reference_answers(dequantized_model_dir, reference, tokenizer, "")
    pad = tokenizer.pad_token_id
    agreement, kl, _ = fidelity.teacher_forced(reference, candidate, prompts, answers, pad)
    assert agreement >= gate.MIN_TOP1_AGREEMENT, (agreement, kl)


def test_the_reference_perplexity_is_computed_once_per_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every build and every check scores the same fp32 model on the same quotes: the second
    time reads the number back; other quotes are computed anew; a damaged cache file is
    computed again, and a read-only folder only means no cache."""
    from core.model import quality

    calls: list[list[str]] = []

    def fake(model: object, tokenizer: object, texts: list[str]) -> float:
        calls.append(texts)
        return 12.5 + len(calls)

    monkeypatch.setattr(quality, "perplexity", fake)
    assert gate.reference_perplexity(tmp_path, None, None, ["a", "b"]) == 13.5
    assert gate.reference_perplexity(tmp_path, None, None, ["a", "b"]) == 13.5
    assert gate.reference_perplexity(tmp_path, None, None, ["c"]) == 14.5
    assert len(calls) == 2
    (cached,) = [f for f in tmp_path.glob("heldout-perplexity-*.json") if "13.5" in f.read_text()]
    cached.write_text("{half", encoding="utf-8")
    assert gate.reference_perplexity(tmp_path, None, None, ["a", "b"]) == 15.5
    assert gate.reference_perplexity(tmp_path / "missing", None, None, ["d"]) == 16.5
