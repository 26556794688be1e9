"""The name a model is served under: one LLaVA's web UI maps to the checkpoint's own
conversation template.

LLaVA's web UI picks its prompt format from the model's name alone
(``llava/serve/gradio_web_server.py``, ``http_bot``): ``llava`` gives its v0 format
(``###Human: ... ###Assistant:``), a name with ``llava`` and ``v1`` the llava-1.5 one
(``USER: ... ASSISTANT:``), ``mistral`` the ``[INST]`` one, ``llava-v1.6-34b`` ChatML.
LLaVA's worker names a model after its checkpoint directory
(``llava/mm_utils.py``, ``get_model_name_from_path``), which the rule maps right for
LLaVA's own checkpoints. llava-hf directories are spelled otherwise (``llava-1.5-7b-hf``:
no ``v1``), so the name is derived from the directory the way LLaVA's own checkpoint is
named (``llava-v1.5-7b``), then checked against the checkpoint's chat template, rendered
on a sample conversation: a name the rule would map to another format gets the family's
marker added (the tiny test checkpoint ``tiny-llava`` is served as ``tiny-llava-v1.5``).

Torch-free; the Triton model names stay as they are (``llava`` is the ensemble that
tritonclient users call): the node reports the served name as a metric
(:data:`llava_wire.protocol.MODEL_INFO_METRIC`) and the control plane lists it.
"""

from __future__ import annotations

import logging
import re
from pathlib import PurePosixPath
from typing import Any

__all__ = [
    "SERVED_NAME_ENV",
    "derive_served_name",
    "render_sample",
    "served_name",
    "template_family",
    "ui_template",
]

log = logging.getLogger(__name__)

SERVED_NAME_ENV = "LLAVA_SERVED_NAME"
_VALID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

# A family's marker (appended to a name the rule maps elsewhere) and its name on its own.
_MARKERS = {
    "llava_v1": ("v1.5", "llava-v1.5"),
    "mistral_instruct": ("v1.6-mistral", "llava-v1.6-mistral"),
    "chatml_direct": ("llava-v1.6-34b", "llava-v1.6-34b"),
    "llava_llama_2": ("llama-2", "llava-llama-2"),
    "llava_v0": ("v0", "llava-v0"),
}


def ui_template(name: str) -> str:
    """The conversation template LLaVA's web UI picks for a model named ``name``, for the
    multimodal (``llava``) names: our reading of ``http_bot``'s rule (its text-only
    branches are reported as ``not_llava``)."""
    n = name.lower()
    if "llava" not in n:
        return "not_llava"
    plain = "plain" in n and "finetune" not in n
    if "llama-2" in n:
        return "llava_llama_2"
    if "mistral" in n or "mixtral" in n:
        return "mistral_orca" if "orca" in n else "chatml_direct" if "hermes" in n else "mistral_instruct"
    if "llava-v1.6-34b" in n:
        return "chatml_direct"
    if "v1" in n:
        return "v1_mmtag" if "mmtag" in n or plain else "llava_v1"
    if "mpt" in n:
        return "mpt"
    return "v0_mmtag" if "mmtag" in n or plain else "llava_v0"


def template_family(rendered: str) -> str | None:
    """Which of LLaVA's templates a chat template's rendering of a sample conversation
    is written in; None when it is none of them."""
    if "<|im_start|>" in rendered:
        return "chatml_direct"
    if "[INST]" in rendered:
        return "llava_llama_2" if "<<SYS>>" in rendered else "mistral_instruct"
    if "USER:" in rendered and "ASSISTANT:" in rendered:
        return "llava_v1"
    if "###" in rendered and "Human" in rendered:
        return "llava_v0"
    return None


def render_sample(processor: Any) -> str | None:
    """A processor's chat template applied to a one-question conversation with an image,
    with the generation prompt; None when it has no template or the template fails."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    try:
        return str(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    except Exception:  # no template, or one that needs other messages: no evidence either way
        return None


def _directory_name(checkpoint: str) -> str:
    parts = [p for p in PurePosixPath(checkpoint.replace("\\", "/").strip("/")).parts if p]
    if not parts:
        return "llava"
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:  # as LLaVA's worker names one
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]


def derive_served_name(checkpoint: str, family: str | None) -> str:
    """A served name for ``checkpoint`` (a directory or hub id) whose chat template is of
    ``family`` (:func:`template_family`): its directory name without llava-hf's spelling
    (``llava-1.5-7b-hf`` -> ``llava-v1.5-7b``), and if LLaVA's web UI would map that to
    another template, with the family's marker added."""
    name = _directory_name(checkpoint)
    name = re.sub(r"[-_]hf$", "", name, flags=re.IGNORECASE)
    name = re.sub(r"(?i)^llava-(\d)", r"llava-v\1", name)
    name = re.sub(r"[^A-Za-z0-9._:-]+", "-", name).strip("-._:")[:100] or "llava"
    if family is None or family not in _MARKERS or ui_template(name) == family:
        return name
    marker, alone = _MARKERS[family]
    joiner = "-" if "llava" in name.lower() or marker.startswith("llava") else "-llava-"
    for candidate in (f"{name}{joiner}{marker}", alone):
        if ui_template(candidate) == family:
            return candidate
    return alone


def served_name(checkpoint: str, processor: Any, override: str = "") -> str:
    """The name to serve ``checkpoint`` under: ``override`` (a model's ``served_name``
    parameter or ``$LLAVA_SERVED_NAME``) if given, else :func:`derive_served_name` from the
    processor's chat template. An override LLaVA's web UI maps to another template than the
    checkpoint's is kept, with a warning."""
    rendered = render_sample(processor)
    family = template_family(rendered) if rendered is not None else None
    override = override.strip()
    if not override:
        return derive_served_name(checkpoint, family)
    if not _VALID.fullmatch(override):
        raise ValueError(
            f"served name {override!r}: use 1 to 128 letters, digits and . _ : - (starting with a letter or digit)"
        )
    if family is not None and ui_template(override) != family:
        log.warning(
            "served name %r: LLaVA's web UI would format prompts as %s, the checkpoint's template is %s",
            override,
            ui_template(override),
            family,
        )
    return override
