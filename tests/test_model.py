"""The embedded model build and model sources: real GPTQ 4-bit, quality, folders, hub ids."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.app import App
from core.errors import ModelError
from core.model import build
from core.model.loader import folder_size, quant_layers
from core.model.source import resolve

ROOT = Path(__file__).resolve().parent.parent


async def test_layers_are_really_gptq_4bit(session_app: App, embedded_model_dir: Path) -> None:
    model = await session_app.engine.run_on_model(lambda model, _tokenizer: model)
    layers = quant_layers(model)
    config = json.loads((embedded_model_dir / "config.json").read_text())
    recipe = json.loads((embedded_model_dir / "loracord-build.json").read_text())["recipe"]
    # 30 decoder blocks x (q, k, v, o, gate, up, down); the fallback recipe keeps down in 16-bit.
    per_block = 6 if recipe["keep_down_proj"] else 7
    first = model.model.layers[0].self_attn.q_proj
    linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    # On a CPU without bf16 the model serves in fp32, and the loader dequantizes each GPTQ
    # layer once from its 4-bit codes into a flagged dense layer (`_dequantize_once_if_small`)
    dequantized = [m for m in linears if m.__dict__.get("loracord_dequantized")]
    if dequantized:
        assert not layers and len(dequantized) == 30 * per_block
        assert first in dequantized
    else:
        assert len(layers) == 30 * per_block
        assert first in layers
        assert not first.qweight.is_floating_point()  # packed 4-bit codes, not weights
        assert first.bits == 4
    plain = [m for m in linears if not m.__dict__.get("loracord_dequantized")]
    assert len(plain) == 30 * (7 - per_block)
    quant = config["quantization_config"]
    assert quant["quant_method"] == "gptq" and quant["bits"] == 4
    assert quant["group_size"] in (32, 64)
    assert "dataset" not in quant  # calibration texts are not shipped in the config


def test_size_on_disk_is_a_fraction_of_fp32(
    embedded_model_dir: Path, dequantized_model_dir: Path
) -> None:
    gptq = folder_size(embedded_model_dir)
    fp32 = folder_size(dequantized_model_dir)
    # The tied 49152x576 embedding stays in 16-bit; the 4-bit blocks are ~1/7 of fp32.
    assert gptq < 0.4 * fp32, (gptq, fp32)


def test_heldout_quotes_never_reach_calibration() -> None:
    calibration, heldout = build.quote_corpus()
    assert len(heldout) >= 100 and len(calibration) >= 150
    assert not set(calibration) & set(heldout)
    again = build.quote_corpus()
    assert again == (calibration, heldout)


def test_local_folder_must_be_gptq(tmp_path: Path, dequantized_model_dir: Path) -> None:
    with pytest.raises(ModelError, match="not a GPTQ checkpoint"):
        resolve(str(dequantized_model_dir), tmp_path)
    with pytest.raises(ModelError, match=r"no config\.json"):
        resolve(str(tmp_path), tmp_path)
    with pytest.raises(ModelError, match="no such folder"):
        resolve(str(tmp_path / "nothing-here"), tmp_path)


def test_local_gptq_folder_resolves(embedded_model_dir: Path, tmp_path: Path) -> None:
    resolved = resolve(str(embedded_model_dir), tmp_path)
    assert resolved.origin == "folder" and resolved.path == embedded_model_dir


def _hf_cache_with(model_dir: Path, cache: Path, repo_id: str) -> None:
    """Lay a model out as huggingface_hub's cache does: blobs, snapshots/<sha>, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    sha = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.is_file():
            os.symlink(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "bot.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=ROOT,
    )


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORACORD_", "HF_"))}
    env.pop("DISCORD_TOKEN", None)
    from tests.conftest import CACHE_DIR

    env.update(
        LORACORD_CACHE_DIR=str(CACHE_DIR),
        LORACORD_DATA_DIR=str(tmp_path / "data"),
        LORACORD_CONFIG=str(tmp_path / "none.toml"),
        **extra,
    )
    (tmp_path / "none.toml").write_text("")
    return env


def test_hub_id_loads_offline_from_the_hf_cache(embedded_model_dir: Path, tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    _hf_cache_with(embedded_model_dir, hub, "loracord-test/smollm2-gptq")
    env = _env(
        tmp_path,
        LORACORD_MODEL="loracord-test/smollm2-gptq",
        HF_HUB_CACHE=str(hub),
        HF_HUB_OFFLINE="1",
    )
    done = _cli("model", "info", "--json", env=env)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["name"] == "loracord-test/smollm2-gptq"
    assert info["bits"] == 4 and info["path"].startswith(str(hub))


def test_unknown_hub_id_is_one_clear_line(tmp_path: Path) -> None:
    env = _env(
        tmp_path,
        LORACORD_MODEL="nobody/no-such-model-gptq",
        HF_HUB_CACHE=str(tmp_path / "hub"),
        HF_HUB_OFFLINE="1",
    )
    done = _cli("model", "info", env=env)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines == [lines[-1]] and "no-such-model-gptq" in lines[-1], done.stderr
    assert "Traceback" not in done.stderr


def test_model_info_json(embedded_model_dir: Path, tmp_path: Path) -> None:
    done = _cli("model", "info", "--json", env=_env(tmp_path))
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    for key in ("path", "bits", "group_size", "kernel", "dtype", "device", "size_bytes"):
        assert key in info
    assert info["path"] == str(embedded_model_dir)
    assert info["device"] == "cpu" and info["bits"] == 4
    assert info["size_bytes"] == folder_size(embedded_model_dir)
    manifest = json.loads((embedded_model_dir / "loracord-build.json").read_text())
    assert info["weights_sha256"] == manifest["weights_sha256"]
    assert info["weights_sha256"] == weights_sha256_of_files(embedded_model_dir)


def weights_sha256_of_files(folder: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        digest.update(file.read_bytes())
    return digest.hexdigest()


def test_interrupted_build_leaves_nothing_visible(
    embedded_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    fp_dir = build.dequantized_dir(cache)
    fp_dir.mkdir(parents=True)
    for f in embedded_model_dir.glob("tokenizer*"):
        shutil.copy(f, fp_dir)
    (fp_dir / "loracord-build.json").write_text("{}")

    def killed_while_saving(gguf: Path, fp_dir: Path, folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr("core.model.q4_1.write_checkpoint", killed_while_saving)
    with pytest.raises(KeyboardInterrupt):
        build.ensure_embedded(cache)
    left = sorted(p.name for p in (cache / "models").iterdir())
    assert left == [".build.lock", fp_dir.name], left
