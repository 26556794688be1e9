"""scripts/add_model.py and llava_node.repository: a new model's three directories."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llava_node.launcher import DEFAULT_MODEL_REPOSITORY, PROJECT_ROOT
from llava_node.repository import ModelRepositoryError, add_model

SCRIPT = PROJECT_ROOT / "scripts" / "add_model.py"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    copy = tmp_path / "repo"
    shutil.copytree(DEFAULT_MODEL_REPOSITORY, copy)
    return copy


@pytest.fixture
def checkpoint_dir(tmp_path: Path) -> Path:
    """Looks like a llava-hf checkpoint to the script (the files need not be real here)."""
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"")
    return d


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT
    )


def test_script_writes_an_ensemble_and_its_steps(repo: Path, checkpoint_dir: Path) -> None:
    out = run_script("llava-b", "--checkpoint", str(checkpoint_dir), "--repository", str(repo))
    assert out.returncode == 0, out.stderr
    assert "warning" not in out.stderr
    ensemble = (repo / "llava-b" / "config.pbtxt").read_text()
    assert 'name: "llava-b"' in ensemble
    assert 'model_name: "llava-b_preprocess"' in ensemble and 'model_name: "llava-b_engine"' in ensemble
    assert '"llava_' not in ensemble
    for step in ("preprocess", "engine"):
        config = (repo / f"llava-b_{step}" / "config.pbtxt").read_text()
        assert f'name: "llava-b_{step}"' in config
        assert f'key: "checkpoint" value: {{ string_value: "{checkpoint_dir}" }}' in config
        model_py = repo / f"llava-b_{step}" / "1" / "model.py"
        assert model_py.read_text() == (repo / f"llava_{step}" / "1" / "model.py").read_text()
    # the original is untouched; no staging directory is left behind
    assert (repo / "llava" / "config.pbtxt").read_text() == (
        DEFAULT_MODEL_REPOSITORY / "llava" / "config.pbtxt"
    ).read_text()
    assert sorted(p.name for p in repo.parent.iterdir() if p.name.startswith(".add-")) == []


def test_existing_model_needs_force(repo: Path, checkpoint_dir: Path, tmp_path: Path) -> None:
    add_model(repo, "other", checkpoint_dir)
    refused = run_script("other", "--checkpoint", str(checkpoint_dir), "--repository", str(repo))
    assert refused.returncode == 2 and "--force" in refused.stderr
    second = tmp_path / "ckpt2"
    shutil.copytree(checkpoint_dir, second)
    forced = run_script("other", "--checkpoint", str(second), "--repository", str(repo), "--force")
    assert forced.returncode == 0, forced.stderr
    assert str(second) in (repo / "other_engine" / "config.pbtxt").read_text()


def test_checkpoint_must_exist_and_look_like_one(repo: Path, tmp_path: Path) -> None:
    missing = run_script("x1", "--checkpoint", str(tmp_path / "nope"), "--repository", str(repo))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert not (repo / "x1").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    warned = run_script("x2", "--checkpoint", str(empty), "--repository", str(repo))
    assert warned.returncode == 0 and "does not look like a llava-hf checkpoint" in warned.stderr
    assert (repo / "x2_engine" / "config.pbtxt").is_file()


@pytest.mark.parametrize("name", ["llava", "x_engine", "y_preprocess", "", "-x", "a/b", "a b"])
def test_bad_names_are_refused(repo: Path, checkpoint_dir: Path, name: str) -> None:
    with pytest.raises(ModelRepositoryError):
        add_model(repo, name, checkpoint_dir)


def test_a_repository_without_llava_uses_the_projects_templates(tmp_path: Path, checkpoint_dir: Path) -> None:
    empty_repo = tmp_path / "bare"
    empty_repo.mkdir()
    added = add_model(empty_repo, "solo", checkpoint_dir)
    assert sorted(p.name for p in empty_repo.iterdir()) == ["solo", "solo_engine", "solo_preprocess"]
    assert added.warnings == []
