"""Adding a model to a Triton model repository: one more LLaVA variant, served beside ``llava``.

A model is three Triton models, named after it: the ensemble ``NAME`` and its steps
``NAME_preprocess`` and ``NAME_engine``. Their configs are the ``llava`` ones with the
names replaced and the ``checkpoint`` parameter set to the checkpoint's directory, so
each model reads its own weights whatever ``LLAVA_CHECKPOINT`` the node has; the
``model.py`` files are copies of the ``llava`` steps' own.

Command line: ``scripts/add_model.py NAME --checkpoint DIR [--repository DIR] [--force]``.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from llava_wire.protocol import STEP_SUFFIXES

__all__ = ["STEPS", "AddedModel", "ModelRepositoryError", "add_model", "check_model_name"]

BASE_MODEL = "llava"
STEPS = STEP_SUFFIXES  # the suffixes of an ensemble's step models
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_CHECKPOINT_PARAM = re.compile(r'(parameters \{ key: "checkpoint" value: \{ string_value: )"[^"\n]*"')


class ModelRepositoryError(ValueError):
    """The model cannot be added (bad name, missing checkpoint, existing model, bad template)."""


@dataclass
class AddedModel:
    """What :func:`add_model` wrote."""

    name: str
    checkpoint: Path
    directories: list[Path]
    warnings: list[str] = field(default_factory=list)


def check_model_name(name: str) -> str:
    """Check a new model's name: a Triton model name that clients address (not a step's)."""
    if not _NAME.match(name):
        raise ModelRepositoryError(
            f"model name {name!r}: use letters, digits, '_', '.' and '-' (at most 100, "
            "starting with a letter or digit)"
        )
    if name.endswith(STEPS):
        raise ModelRepositoryError(
            f"model name {name!r} ends like an ensemble step ({', '.join(STEPS)}); clients could not address it"
        )
    return name


def _template_dir(repository: Path) -> Path:
    """Where the ``llava`` configs to copy live: the repository's own, else the project's."""
    if all((repository / f"{BASE_MODEL}{s}" / "config.pbtxt").is_file() for s in ("", *STEPS)):
        return repository
    from llava_node.launcher import DEFAULT_MODEL_REPOSITORY

    return DEFAULT_MODEL_REPOSITORY


def _rewrite(config: str, name: str, suffix: str, checkpoint: Path, source: Path) -> str:
    """A ``llava*`` config with the names replaced and the checkpoint set."""
    text, n = re.subn(
        rf'^name: "{BASE_MODEL}{suffix}"$', f'name: "{name}{suffix}"', config, count=1, flags=re.M
    )
    if n != 1:
        raise ModelRepositoryError(f"{source}: no line 'name: \"{BASE_MODEL}{suffix}\"' to rename")
    if suffix == "":
        for step in STEPS:
            text, n = re.subn(rf'model_name: "{BASE_MODEL}{step}"', f'model_name: "{name}{step}"', text)
            if n != 1:
                raise ModelRepositoryError(
                    f"{source}: expected one step 'model_name: \"{BASE_MODEL}{step}\"'"
                )
        return text
    # json.dumps quotes the path as protobuf text format wants (backslash escapes).
    text, n = _CHECKPOINT_PARAM.subn(lambda m: m.group(1) + json.dumps(str(checkpoint)), text, count=1)
    if n != 1:
        raise ModelRepositoryError(f"{source}: no 'checkpoint' parameter to set")
    return text


def add_model(repository: Path, name: str, checkpoint: Path, *, force: bool = False) -> AddedModel:
    """Write ``NAME``, ``NAME_preprocess`` and ``NAME_engine`` into ``repository``.

    Refuses to replace existing models unless ``force``; the checkpoint directory must
    exist (a directory that does not look like a llava-hf checkpoint is only warned
    about: the node says why when it loads the model). The three directories are built
    aside and moved in, so a node never sees half a model.
    """
    from llava_node.tiny_checkpoint import is_checkpoint

    check_model_name(name)
    if name == BASE_MODEL:
        raise ModelRepositoryError(
            f"{BASE_MODEL!r} is the model the others are copied from; pick another name"
        )
    repository = Path(repository).resolve()
    if not repository.is_dir():
        raise ModelRepositoryError(f"model repository {repository} is not a directory")
    checkpoint = Path(checkpoint).expanduser().resolve()
    if not checkpoint.is_dir():
        raise ModelRepositoryError(f"checkpoint directory {checkpoint} does not exist")
    warnings = []
    if not is_checkpoint(checkpoint):
        warnings.append(
            f"{checkpoint} has no config.json and *.safetensors: it does not look like a llava-hf "
            "checkpoint, so loading the model will fail until it does"
        )
    targets = {s: repository / f"{name}{s}" for s in ("", *STEPS)}
    existing = [p for p in targets.values() if p.exists()]
    if existing and not force:
        raise ModelRepositoryError(
            f"{', '.join(str(p) for p in existing)} already exist(s); pass --force to replace"
        )
    source = _template_dir(repository)
    staging = Path(tempfile.mkdtemp(prefix=f".add-{name}-", dir=repository.parent))
    try:
        for suffix in targets:
            src = source / f"{BASE_MODEL}{suffix}"
            dst = staging / f"{name}{suffix}"
            (dst / "1").mkdir(parents=True)
            config = (src / "config.pbtxt").read_text()
            (dst / "config.pbtxt").write_text(
                _rewrite(config, name, suffix, checkpoint, src / "config.pbtxt")
            )
            if (src / "1" / "model.py").is_file():
                shutil.copy2(src / "1" / "model.py", dst / "1" / "model.py")
        for suffix, target in targets.items():
            if target.exists():
                shutil.rmtree(target)
            (staging / f"{name}{suffix}").rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return AddedModel(name=name, checkpoint=checkpoint, directories=list(targets.values()), warnings=warnings)
