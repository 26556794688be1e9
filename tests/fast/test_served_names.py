"""Served model names: LLaVA's web UI picks its prompt format from the model's name, so
every name we derive for a checkpoint must map, by the UI's own rule, to the template the
checkpoint was tuned on; the control plane lists those names and takes them in requests."""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest

from control_plane.nodes.parsing import MAX_SERVED_NAMES, parse_served_names
from llava_node.served_name import derive_served_name, served_name, template_family, ui_template
from llava_node.tiny_checkpoint import CHAT_TEMPLATE
from tests.fast.harness import Harness, node


def llava_web_ui_template(model_name: str) -> str:
    """The conv_templates key LLaVA's web UI uses for a model, written from the rule in
    haotian-liu/LLaVA ``llava/serve/gradio_web_server.py``, ``http_bot`` (first round of a
    conversation): our own transcription, held separately from llava_node's."""
    n = model_name.lower()
    if "llava" in n:
        if "llama-2" in n:
            return "llava_llama_2"
        if "mistral" in n or "mixtral" in n:
            if "orca" in n:
                return "mistral_orca"
            return "chatml_direct" if "hermes" in n else "mistral_instruct"
        if "llava-v1.6-34b" in n:
            return "chatml_direct"
        if "v1" in n:
            if "mmtag" in n or ("plain" in n and "finetune" not in n):
                return "v1_mmtag"
            return "llava_v1"
        if "mpt" in n:
            return "mpt"
        if "mmtag" in n or ("plain" in n and "finetune" not in n):
            return "v0_mmtag"
        return "llava_v0"
    if "mpt" in model_name:
        return "mpt_text"
    if "llama-2" in model_name:
        return "llama_2"
    return "vicuna_v1"


def _tiny_rendered() -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    return jinja2.Template(CHAT_TEMPLATE).render(
        messages=messages, add_generation_prompt=True, eos_token="</s>"
    )


VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions. "
)
# checkpoint (as llava-hf names it) -> its chat template applied to one question with an
# image, and the template of LLaVA's (llava/conversation.py conv_templates) it was tuned on
CHECKPOINTS = {
    "llava-hf/llava-1.5-7b-hf": ("USER: <image>\nWhat is this? ASSISTANT:", "llava_v1"),
    "/models/llava-1.5-13b-hf": ("USER: <image>\nWhat is this? ASSISTANT:", "llava_v1"),
    "llava-hf/llava-v1.6-mistral-7b-hf": ("[INST] <image>\nWhat is this? [/INST]", "mistral_instruct"),
    "/models/llava-v1.6-vicuna-7b-hf": (
        VICUNA_SYSTEM + "USER: <image>\nWhat is this? ASSISTANT:",
        "llava_v1",
    ),
    "/models/llava-v1.6-vicuna-13b-hf": (
        VICUNA_SYSTEM + "USER: <image>\nWhat is this? ASSISTANT:",
        "llava_v1",
    ),
    "llava-hf/llava-v1.6-34b-hf": (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is this?"
        "<|im_end|><|im_start|>assistant\n",
        "chatml_direct",
    ),
    "llava-hf/bakLlava-v1-hf": ("USER: <image>\nWhat is this? ASSISTANT:", "llava_v1"),
    "/tmp/ckpt0/tiny-llava": (_tiny_rendered(), "llava_v1"),  # the tests' and the demo's
    "var/checkpoints/tiny-llava/": (_tiny_rendered(), "llava_v1"),
}


@pytest.mark.parametrize("checkpoint", sorted(CHECKPOINTS))
def test_every_derived_served_name_gets_the_checkpoints_template_in_llavas_web_ui(checkpoint: str) -> None:
    rendered, tuned_on = CHECKPOINTS[checkpoint]
    family = template_family(rendered)
    assert family == tuned_on
    name = derive_served_name(checkpoint, family)
    assert llava_web_ui_template(name) == tuned_on, name
    assert name != "llava"  # what the UI would format in LLaVA's v0 format


def test_the_names_llava_itself_uses_are_derived_for_llava_hf_checkpoints() -> None:
    derived = {c: derive_served_name(c, template_family(r)) for c, (r, _) in CHECKPOINTS.items()}
    assert derived["llava-hf/llava-1.5-7b-hf"] == "llava-v1.5-7b"  # LLaVA's own checkpoint name
    assert derived["/models/llava-1.5-13b-hf"] == "llava-v1.5-13b"
    assert derived["llava-hf/llava-v1.6-mistral-7b-hf"] == "llava-v1.6-mistral-7b"
    assert derived["llava-hf/llava-v1.6-34b-hf"] == "llava-v1.6-34b"
    assert derived["/tmp/ckpt0/tiny-llava"] == "tiny-llava-v1.5"


@pytest.mark.parametrize(
    "name",
    ["llava", "llava-v1.5-7b", "llava-v1.6-mistral-7b", "llava-v1.6-34b", "LLaVA-Llama-2-13b", "llava-mpt-7b",
     "llava-v1-plain", "llava-v1-plain-finetune", "llava-mmtag", "bakLlava-v1", "llava-hermes-mistral",
     "llava-orca-mistral", "vicuna-7b", "tiny-llava-v1.5"],
)  # fmt: skip
def test_the_nodes_reading_of_the_rule_agrees_with_the_rule(name: str) -> None:
    expected = llava_web_ui_template(name)
    assert ui_template(name) == (expected if "llava" in name.lower() else "not_llava")


def test_an_unknown_template_keeps_the_directory_name_and_an_override_wins() -> None:
    assert derive_served_name("/m/my-model-hf", None) == "my-model"
    assert derive_served_name("/m/my-model", "llava_v1") == "my-model-llava-v1.5"
    assert llava_web_ui_template(derive_served_name("/m/llava-v1.5-mistral-7b", "llava_v1")) == "llava_v1"

    class Processor:
        def apply_chat_template(self, *_args: object, **_kwargs: object) -> str:
            return "USER: <image>\nWhat is this? ASSISTANT:"

    assert served_name("/m/llava-1.5-7b-hf", Processor()) == "llava-v1.5-7b"
    assert served_name("/m/llava-1.5-7b-hf", Processor(), override="my-llava-v1") == "my-llava-v1"
    with pytest.raises(ValueError, match="served name"):
        served_name("/m/x", Processor(), override="bad name")


def test_served_names_are_read_defensively_from_a_metrics_page() -> None:
    page = "\n".join(
        [
            "# TYPE llava_served_model_info gauge",
            'llava_served_model_info{checkpoint="/a \\"b\\"",model="llava_preprocess",served_name="llava-v1.5-7b"} 1',
            'llava_served_model_info{model="x_preprocess",served_name="no spaces allowed"} 1',
            'llava_served_model_info{model="y_preprocess",served_name="' + "n" * 200 + '"} 1',
            'llava_served_model_info{model="llava_engine",served_name="not-a-preprocess-step"} 1',
            'llava_served_model_info{model="llava_preprocess",served_name="second-name-ignored"} 1',
            "llava_served_model_info{garbage",
        ]
    )
    assert parse_served_names(page) == {"llava": "llava-v1.5-7b"}
    flood = "\n".join(
        f'llava_served_model_info{{model="m{i}_preprocess",served_name="n{i}"}} 1' for i in range(10_000)
    )
    assert len(parse_served_names(flood)) == MAX_SERVED_NAMES


async def test_the_served_name_is_listed_taken_in_requests_and_the_triton_name_recorded(
    tmp_path: Path,
) -> None:
    a = node(9000, served_names={"llava": "llava-v1.5-7b"})
    # (no minimum replica: the unload below must not be undone by the lifecycle's reload)
    async with Harness(tmp_path, [a], model_min_replicas={"llava": 0}).running() as h:
        assert (await h.client.post("/list_models")).json() == {"models": ["llava-v1.5-7b"]}
        cards = (await h.client.get("/v1/models")).json()["data"]
        assert [(c["id"], c["ready"]) for c in cards] == [("llava-v1.5-7b", True)]
        assert (await h.client.get("/v1/models/llava-v1.5-7b")).status == 200
        assert (await h.client.get("/v1/models/llava")).json()["id"] == "llava-v1.5-7b"
        address = (await h.client.post("/get_worker_address", {"model": "llava-v1.5-7b"})).json()["address"]
        assert address
        for model in ("llava-v1.5-7b", "llava"):  # both names are taken
            assert (await h.llava(model=model)).frames()[-1]["error_code"] == 0
            chat = await h.chat(model=model)
            assert chat.status == 200 and chat.json()["model"] == model  # echoes what was asked
        assert [s.model for s in a.streams] == ["llava"] * 4
        rows = await h.rows("SELECT DISTINCT model FROM requests")
        assert rows == [{"model": "llava"}]
        unknown = await h.chat(model="gpt-4o")  # the error names what may be asked for
        assert unknown.status == 404
        assert "(models available: llava-v1.5-7b)" in unknown.json()["error"]["message"]
        a.models["llava"] = "UNAVAILABLE"  # unloaded: the name it was reported under stays
        await eventually_listed(h, [])
        assert (await h.client.post("/list_models")).json() == {"models": ["llava-v1.5-7b"]}


async def eventually_listed(h: Harness, ready: list[str]) -> None:
    from tests.fast.harness import eventually

    await eventually(lambda: h.cp.store.listed_models() == ready, what=f"ready models {ready}")


async def test_an_alias_set_on_the_control_plane_wins_and_a_name_that_hides_a_model_is_ignored(
    tmp_path: Path,
) -> None:
    a = node(9000, served_names={"llava": "llava-v1.5-7b"})
    a.models.update({"other": "READY", "other_preprocess": "READY", "other_engine": "READY"})
    a.served_names["other"] = "llava"  # would hide the Triton model llava
    async with Harness(tmp_path, [a], model_aliases={"llava": "llava-v1.5-13b"}).running() as h:
        assert (await h.client.post("/list_models")).json() == {"models": ["llava-v1.5-13b", "other"]}
        assert h.cp.names.resolve("llava-v1.5-13b") == "llava"
        assert h.cp.names.resolve("llava") == "llava"
        assert h.cp.names.resolve("llava-v1.5-7b") == "llava-v1.5-7b"  # not served so: unknown


async def test_models_on_one_checkpoint_keep_one_name_each(tmp_path: Path) -> None:
    a = node(9000, served_names={"llava": "tiny-llava-v1.5", "alpha": "tiny-llava-v1.5"})
    a.models.update({"alpha": "READY", "alpha_preprocess": "READY", "alpha_engine": "READY"})
    async with Harness(tmp_path, [a]).running() as h:  # llava: the default model keeps the name
        assert (await h.client.post("/list_models")).json() == {"models": ["alpha", "tiny-llava-v1.5"]}
        assert h.cp.names.resolve("tiny-llava-v1.5") == "llava" and h.cp.names.resolve("alpha") == "alpha"
