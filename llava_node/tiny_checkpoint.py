"""Build a deterministic, tiny llava-hf checkpoint for tests and the default demo.

The checkpoint is a real ``LlavaForConditionalGeneration`` directory that
``from_pretrained`` loads like any llava-hf model: a 2-layer Llama language model,
a 2-layer CLIP vision tower, random weights from a fixed seed, a byte-level BPE
tokenizer trained here with ``tokenizers`` (``<image>`` is a special added token),
a CLIP image processor (PIL backend), a LLaVA-1.5-style chat template, and a ``LlavaProcessor``.
Nothing is downloaded. Two builds with the same seed are identical.

Usage::

    python -m llava_node.tiny_checkpoint var/checkpoints/tiny-llava [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CHAT_TEMPLATE", "build_llava_7b_shaped_checkpoint", "build_tiny_checkpoint", "is_checkpoint"]

# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT:"), written as a
# Jinja chat template over OpenAI-style content parts, as llava-hf checkpoints ship it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ ' ' }}"
    "{% else %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ ' ' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_WORDS = (  # noqa: SIM905 - a word list reads best as text
    "the a an image picture photo shows contains red green blue yellow black white "
    "cat dog bird car tree house sky water person people man woman child street road "
    "left right top bottom center background foreground small large bright dark color "
    "what is in this describe please answer question user assistant system you are "
    "helpful there one two three four many some with and of on at to for from it its "
    "square circle line shape pixel stripe gradient noise pattern corner edge "
).split()


def _corpus(seed: int) -> list[str]:
    """Deterministic training text for the tokenizer: words, digits and punctuation."""
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(3000):
        n = rng.randint(3, 14)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 999)))
        sentence = " ".join(words)
        lines.append(sentence.capitalize() + rng.choice([".", "?", "!", ",", ":"]))
    lines.append("USER: ASSISTANT: \n" * 4)
    lines.append("".join(chr(c) for c in range(32, 127)))
    return lines


def _synthetic_corpus(seed: int, lines: int = 60000) -> list[str]:
    """Made-up words from syllables: enough distinct merges for a 32k vocabulary."""
    import random

    rng = random.Random(seed)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"] + list("aeiou")
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(60000)]
    words += _WORDS
    return _corpus(seed) + [" ".join(rng.choice(words) for _ in range(12)) for _ in range(lines)]


def _build_tokenizer(seed: int, vocab_size: int):  # type: ignore[no-untyped-def]
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed) if vocab_size <= 4096 else _synthetic_corpus(seed), trainer=trainer)
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        add_bos_token=True,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` looks like a llava-hf checkpoint directory."""
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


@dataclass(frozen=True)
class _Shape:
    """Sizes of a LLaVA-1.5-style model: Llama decoder, CLIP vision tower."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    max_positions: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    vision_projection: int
    vision_act: str
    image_size: int
    patch_size: int


def _llava_config(tokenizer: Any, shape: _Shape) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=shape.max_positions,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=shape.vision_hidden,
        intermediate_size=shape.vision_intermediate,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
        projection_dim=shape.vision_projection,
        hidden_act=shape.vision_act,
    )
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),  # type: ignore[call-arg]
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(shape.image_size // shape.patch_size) ** 2,
    )


def _save_processor_and_card(out: Path, tokenizer: Any, shape: _Shape, card: dict[str, Any]) -> None:
    # The PIL backend by name: the same pixels on every machine, and no notice about a
    # missing torchvision (``CLIPImageProcessor`` names the torchvision backend now)
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    size = shape.image_size
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        ),
        tokenizer=tokenizer,
        patch_size=shape.patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(out)
    card = {"built_by": "llava_node.tiny_checkpoint", "random_weights": True, **card}
    (out / "TINY_CHECKPOINT.json").write_text(json.dumps(card))


def build_tiny_checkpoint(
    out_dir: str | Path,
    *,
    seed: int = 0,
    image_size: int = 336,
    patch_size: int = 14,
    hidden_size: int = 64,
    vocab_size: int = 1024,
    max_positions: int = 2048,
) -> Path:
    """Write a tiny llava-hf checkpoint to ``out_dir`` and return its path.

    Deterministic for a given ``seed``: the tokenizer and the weights are the same on
    every machine and every run.
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(seed, vocab_size)
    shape = _Shape(
        hidden_size,
        hidden_size * 2,
        2,
        4,
        max_positions,
        32,
        64,
        2,
        2,
        32,
        "quick_gelu",
        image_size,
        patch_size,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(_llava_config(tokenizer, shape)).eval()
    # The default init draws small weights whose greedy output repeats one token; a
    # wider spread gives varied text that depends on the image, which makes
    # token-exact and stop-string tests meaningful.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                std = 1.0 if "embed_tokens" in name else 0.3
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 32
    model.save_pretrained(out)
    _save_processor_and_card(out, tokenizer, shape, {"seed": seed})
    return out


def build_llava_7b_shaped_checkpoint(out_dir: str | Path, *, seed: int = 0, device: str = "cuda") -> Path:
    """Write a checkpoint of LLaVA-1.5-7B's shape with random bf16 weights (for benchmarks).

    Llama-2-7B language model (32 layers, 4096 wide, MHA), CLIP ViT-L/14 at 336 pixels
    (24 layers, 576 image tokens), a 2-layer GELU projector, a 32k byte-level BPE
    tokenizer trained here. The cost per token is that of the real model; the output
    is noise. Built on ``device`` (a GPU: seconds), written as safetensors (~14 GB).
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(seed, 32000)
    shape = _Shape(4096, 11008, 32, 32, 4096, 1024, 4096, 24, 16, 768, "quick_gelu", 336, 14)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(_llava_config(tokenizer, shape)).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    del model
    _save_processor_and_card(out, tokenizer, shape, {"seed": seed, "shape": "llava-1.5-7b"})
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: build a tiny checkpoint into a directory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    parser.add_argument("--shape", choices=["tiny", "llava-1.5-7b"], default="tiny")
    args = parser.parse_args(argv)
    if is_checkpoint(args.out_dir) and not args.force:
        print(f"checkpoint already at {args.out_dir}")
        return 0
    if args.shape == "llava-1.5-7b":
        path = build_llava_7b_shaped_checkpoint(args.out_dir, seed=args.seed)
        print(f"built a LLaVA-1.5-7B-shaped checkpoint (random bf16 weights) at {path}")
        return 0
    path = build_tiny_checkpoint(args.out_dir, seed=args.seed)
    print(f"built tiny llava checkpoint (random weights, seed {args.seed}) at {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
