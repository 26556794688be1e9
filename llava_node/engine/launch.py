"""What the Triton kernels' launches share: the device's multiprocessor count, and
programmatic dependent launch (PDL) for the kernels of one-row steps (batch-1 decode).

A batch-1 decode step is ~350 kernels in a row, each a few microseconds to a few tens
of them: on Hopper the time between one kernel's last program and the next one's first
(the drain of the last wave, the launch, the ramp up) is a large part of the step
(4.00 -> 3.82 ms a 7B step with PDL on an H200). The runner uses it for one-row steps
only: at 8 to 64 streams the same launches made the node 10-16 % slower. With
PDL (compute capability 9.0 on, ``launch_pdl`` in Triton) a kernel is launched while its
predecessor still runs; its programs do what depends on no earlier kernel (the GEMV
loads its first tile of weights, which nothing writes), then wait for the predecessor to
finish and its writes to be visible (``griddepcontrol.wait``), then let their own
successor launch (``griddepcontrol.launch_dependents``).

Safety, by induction along the stream: a kernel's successor can launch only after all
of the kernel's programs passed their wait, i.e. after the kernel's predecessor ended;
so when a kernel starts, every kernel before its predecessor has ended, and nothing it
does before its own wait reads or writes what the predecessor touches. A kernel that is
not launched with PDL (cuBLAS, torch's) waits for its predecessor as usual, and a PDL
kernel after one of them just finds it ended. CUDA graphs keep the dependency as a
programmatic edge.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import torch
import triton
import triton.language as tl

__all__ = ["DEFAULT_NUM_SMS", "num_sms", "pdl_available", "pdl_enter", "pdl_options"]

# SM count assumed when no CUDA device is involved: Triton's CPU interpreter, which runs a
# grid one program at a time in Python. With a GPU's count (132) the tiny model's decode
# launched a program per output row of every projection (1,025 for its lm_head) and 32
# attention partitions per head, and the fused-path tests took 17 minutes of CI; with 4
# the same kernels run the same branches (several programs, split partitions and their
# reduction, masked tails) on grids 10-60 times smaller.
DEFAULT_NUM_SMS = 4


@functools.lru_cache(maxsize=16)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (:data:`DEFAULT_NUM_SMS` off CUDA)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return DEFAULT_NUM_SMS


@functools.lru_cache(maxsize=8)
def pdl_available(device: torch.device) -> bool:
    """Whether kernels on ``device`` can be launched with PDL: a CUDA device of compute
    capability 9.0 or more, not Triton's interpreter, and a Triton that has ``launch_pdl``
    and the ``griddepcontrol`` instructions."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if torch.cuda.get_device_capability(device)[0] < 9:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # pragma: no cover - a Triton without the NVIDIA backend
        return False
    extra = getattr(tl.extra, "cuda", None)
    has_ops = extra is not None and hasattr(extra, "gdc_wait") and hasattr(extra, "gdc_launch_dependents")
    return has_ops and "launch_pdl" in {f.name for f in dataclasses.fields(CUDAOptions)}


def pdl_options(pdl: bool) -> dict[str, Any]:
    """Keyword arguments of a kernel launch with PDL or without: the kernel's ``USE_GDC``
    constexpr (which compiles :func:`pdl_enter` in or out) and Triton's ``launch_pdl``."""
    return {"USE_GDC": True, "launch_pdl": True} if pdl else {"USE_GDC": False}


@triton.jit  # type: ignore[misc,untyped-decorator]
def pdl_enter(USE_GDC: tl.constexpr):  # type: ignore[no-untyped-def]
    # Wait for the previous kernel (its writes visible), then let the next one launch.
    # Called by every program before it reads or writes anything earlier kernels touch.
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
