"""The start-up freeze of the cycle collector's objects (control plane and both models)."""

from __future__ import annotations

import gc

from llava_node.gc_freeze import freeze_startup_objects


def test_freeze_startup_objects_takes_what_exists_out_of_collections() -> None:
    kept = [[i] for i in range(1000)]  # tracked containers (lists), alive through the freeze
    before = gc.get_freeze_count()
    try:
        freeze_startup_objects()
        frozen = gc.get_freeze_count()
        assert frozen >= before + len(kept)
        made_later = [[i] for i in range(10)]
        walked = {id(x) for x in gc.get_objects()}  # what a collection would traverse
        assert not walked & {id(x) for x in kept}
        assert id(made_later[0]) in walked
    finally:
        gc.unfreeze()
