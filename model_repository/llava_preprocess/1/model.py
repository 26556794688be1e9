"""llava_preprocess: validate a request; build token ids and pixel values (CPU)."""

from __future__ import annotations

import os
import sys

# The Python-backend stub starts its interpreter without reading PYTHONPATH (seen with the
# nvidia-pytriton stub), while the launcher and the node image name the project and its
# packages there: honour it before importing them.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from llava_node.engine.loading import checkpoint_from_env
from llava_node.gc_freeze import freeze_startup_objects, unfreeze_at_shutdown
from llava_node.preprocess import InvalidRequest, Limits, Preprocessor, RawRequest
from llava_node.protocol import CLIENT_ERROR_PREFIX
from llava_node.triton_io import bytes_list, param, scalar, text


class TritonPythonModel:
    """Turns prompt or messages, images and settings into engine inputs."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        checkpoint = checkpoint_from_env(param(config, "checkpoint"))
        limits = Limits(
            max_images=int(param(config, "max_images", default="8")),
            max_image_pixels=int(param(config, "max_image_pixels", default=str(4096 * 4096))),
            max_image_bytes=int(param(config, "max_image_bytes", default=str(20 * 1024 * 1024))),
            max_tokens_limit=int(param(config, "max_tokens_limit", default="4096")),
        )
        self.preprocessor = Preprocessor(checkpoint, limits)
        freeze_startup_objects()

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._one(r) for r in requests]

    def _one(self, request: Any) -> Any:
        try:
            raw = RawRequest(
                prompt=text(pb_utils, request, "prompt"),
                messages=text(pb_utils, request, "messages"),
                images=bytes_list(pb_utils, request, "images"),
                max_tokens=scalar(pb_utils, request, "max_tokens"),
                temperature=scalar(pb_utils, request, "temperature"),
                top_p=scalar(pb_utils, request, "top_p"),
                stop=[s.decode("utf-8", "replace") for s in bytes_list(pb_utils, request, "stop")],
                seed=scalar(pb_utils, request, "seed"),
            )
            prepared = self.preprocessor.prepare(raw)
        except (InvalidRequest, ValueError) as exc:
            return pb_utils.InferenceResponse(
                output_tensors=[],
                error=pb_utils.TritonError(CLIENT_ERROR_PREFIX + str(exc), pb_utils.TritonError.INVALID_ARG),
            )
        except Exception as exc:  # a bug, not the client's fault: say so, keep serving
            return pb_utils.InferenceResponse(
                output_tensors=[],
                error=pb_utils.TritonError(f"preprocessing failed: {exc!r}", pb_utils.TritonError.INTERNAL),
            )
        outputs = [
            pb_utils.Tensor("input_ids", prepared.input_ids),
            pb_utils.Tensor("pixel_values", prepared.pixel_values),
            pb_utils.Tensor("gen_max_tokens", np.array([prepared.max_tokens], dtype=np.int32)),
            pb_utils.Tensor("gen_temperature", np.array([prepared.temperature], dtype=np.float32)),
            pb_utils.Tensor("gen_top_p", np.array([prepared.top_p], dtype=np.float32)),
            pb_utils.Tensor("gen_seed", np.array([prepared.seed], dtype=np.int64)),
            pb_utils.Tensor(
                "gen_stop", np.array([s.encode("utf-8") for s in prepared.stop], dtype=np.object_)
            ),
        ]
        return pb_utils.InferenceResponse(output_tensors=outputs)

    def finalize(self) -> None:
        unfreeze_at_shutdown()
