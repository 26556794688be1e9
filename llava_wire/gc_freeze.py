"""Keep Python's cycle collector off what a server process made at start-up."""

from __future__ import annotations

import gc

__all__ = ["freeze_startup_objects", "unfreeze_at_shutdown"]


def freeze_startup_objects() -> None:
    """Collect once, then freeze every object that exists now (modules, the model, its
    processor, clients): they live as long as the process, and frozen, later full
    collections walk only what requests made.

    A full collection holds the GIL throughout. In a node holding torch, transformers and
    the engine (~380,000 tracked objects) one took ~180 ms on the 2-core CI machine; in
    the control plane, 17-105 ms at 64 streams. Every stream stalls meanwhile. Frozen
    objects are still freed by reference counting; only cycles among them would stay.
    """
    gc.collect()
    gc.freeze()


def unfreeze_at_shutdown() -> None:
    """Give frozen objects back to the collector, so that the interpreter's finalization
    frees them: frozen at exit, extension objects among them (the triton compiler's that
    transformers imports) are reported as leaked by nanobind on the way out."""
    gc.unfreeze()
