"""Shared fixtures: settings in a throwaway data dir, and the real embedded GPTQ model, built once.

The quantized model is built at most once per test run into the cache dir (LORACORD_CACHE_DIR,
default ~/.cache/loracord: outside the checkout) and reused by every test. `.ci/run` points the
cache at a fresh folder so CI really builds it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from core import settings as settings_module
from core.app import App, build
from core.settings import Settings

CACHE_DIR = Path(
    os.environ.get("LORACORD_CACHE_DIR") or Path.home() / ".cache" / "loracord"
).expanduser()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests skip cleanly where torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The embedded model's GPTQ folder (built on first use, then cached)."""
    from core.model.source import resolve

    return resolve("embedded", CACHE_DIR).path


@pytest.fixture(scope="session")
def dequantized_model_dir(embedded_model_dir: Path) -> Path:
    """The fp32 model the GPTQ build was made from (the quality reference)."""
    from core.model.build import dequantized_dir

    return dequantized_dir(CACHE_DIR)


def cache_beside(reference: Path, tmp: Path) -> Path:
    """A fresh cache dir under `tmp` whose fp32 reference is `reference` (linked, not copied)
    and where nothing is built yet: for tests of the build itself."""
    from core.model.build import dequantized_dir

    cache = tmp / "cache"
    (cache / "models").mkdir(parents=True)
    dequantized_dir(cache).symlink_to(reference)
    return cache


def make_settings(tmp: Path, **overrides: object) -> Settings:
    """Settings for a test: real model cache, everything else in `tmp`, no stray environment."""
    values: dict[str, object] = {
        "cache_dir": CACHE_DIR,
        "data_dir": tmp / "data",
        "adapters_dir": tmp / "adapters",
    }
    values.update(overrides)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("LORACORD_") and k != "DISCORD_TOKEN"
    }
    return settings_module.load(None, environ=env, **values)


@pytest.fixture
def settings(tmp_path: Path, embedded_model_dir: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture(scope="session")
def session_app(
    tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path
) -> Iterator[App]:
    """One started app (bf16, the serving default) for the whole run: loading costs seconds."""
    app = build(make_settings(tmp_path_factory.mktemp("app")))
    loop = asyncio.new_event_loop()
    loop.run_until_complete(app.start())
    yield app
    loop.run_until_complete(app.close())
    loop.close()


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[App]:
    """A freshly started app of its own (for tests that close or fill the engine)."""
    application = build(settings)
    await application.start()
    try:
        yield application
    finally:
        await application.close()


@pytest.fixture(autouse=True)
def _quiet_third_party() -> None:
    for name in ("transformers", "optimum", "gptqmodel", "accelerate"):
        logging.getLogger(name).setLevel(logging.WARNING)
