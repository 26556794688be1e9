#!/usr/bin/env python3
"""Add a LLaVA variant to the model repository under a new name, from a checkpoint directory.

    .venv/bin/python scripts/add_model.py llava-13b --checkpoint /models/llava-1.5-13b-hf

writes ``llava-13b`` (ensemble), ``llava-13b_preprocess`` and ``llava-13b_engine`` into
``model_repository/`` (or ``--repository``). Nodes in explicit model-control mode see it
at once; the control plane loads it on the first request (or ``models load``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llava_node.launcher import DEFAULT_MODEL_REPOSITORY
from llava_node.repository import ModelRepositoryError, add_model


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("name", help="the new model's name (what clients send as 'model')")
    parser.add_argument("--checkpoint", type=Path, required=True, help="llava-hf checkpoint directory")
    parser.add_argument("--repository", type=Path, default=DEFAULT_MODEL_REPOSITORY)
    parser.add_argument("--force", action="store_true", help="replace the model if it exists")
    args = parser.parse_args(argv)
    try:
        added = add_model(args.repository, args.name, args.checkpoint, force=args.force)
    except ModelRepositoryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for warning in added.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"added model {added.name!r} (checkpoint {added.checkpoint}):")
    for d in added.directories:
        print(f"  {d}")
    print(
        "Nodes in explicit model-control mode list it now; the control plane loads it on the "
        f"first request, or: python -m control_plane models load {added.name}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
