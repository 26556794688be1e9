"""llava_preprocess: validate a request; build token ids and pixel values (CPU)."""

from __future__ import annotations

import os
import sys

# The Python-backend stub starts its interpreter without reading PYTHONPATH (seen with the
# nvidia-pytriton stub), while the launcher and the node image name the project and its
# packages there: honour it before importing them.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import json
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from llava_node.checkpoints import checkpoint_from_env
from llava_node.preprocess import InvalidRequest, Limits, Preprocessor, RawRequest
from llava_node.served_name import SERVED_NAME_ENV, served_name
from llava_node.triton_io import bytes_list, int_list, param, scalar, text, text_list
from llava_wire.gc_freeze import freeze_startup_objects, unfreeze_at_shutdown
from llava_wire.protocol import CLIENT_ERROR_PREFIX, MODEL_INFO_METRIC, error_text


class TritonPythonModel:
    """Turns prompt or messages, images and settings into engine inputs."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        checkpoint = checkpoint_from_env(param(config, "checkpoint"))
        d = Limits()  # the defaults, and why, are in Limits' docstring

        def limit(key: str, default: float) -> str:
            return param(config, key, default=str(default))

        limits = Limits(
            max_images=int(limit("max_images", d.max_images)),
            max_image_pixels=int(limit("max_image_pixels", d.max_image_pixels)),
            max_image_bytes=int(limit("max_image_bytes", d.max_image_bytes)),
            max_image_side=int(limit("max_image_side", d.max_image_side)),
            max_image_aspect=float(limit("max_image_aspect", d.max_image_aspect)),
            max_resized_pixels=int(limit("max_resized_pixels", d.max_resized_pixels)),
            max_prompt_bytes=int(limit("max_prompt_bytes", d.max_prompt_bytes)),
            max_tokens_limit=int(limit("max_tokens_limit", d.max_tokens_limit)),
        )
        self.preprocessor = Preprocessor(checkpoint, limits)
        self._export_served_name(
            args["model_name"], str(checkpoint), param(config, "served_name", SERVED_NAME_ENV)
        )
        freeze_startup_objects()

    def _export_served_name(self, model_name: str, checkpoint: str, override: str) -> None:
        """The name LLaVA's web UI should see, as a metric the control plane reads."""
        name = served_name(checkpoint, self.preprocessor.processor, override)
        # A Metric stays valid only while its MetricFamily object lives: keep both.
        self._info_family = pb_utils.MetricFamily(
            name=MODEL_INFO_METRIC,
            description="The name each model is served under (value 1)",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        labels = {"model": model_name, "served_name": name, "checkpoint": Path(checkpoint).name[:200]}
        self._info = self._info_family.Metric(labels=labels)
        self._info.set(1)

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
                stop=text_list(pb_utils, request, "stop"),
                seed=scalar(pb_utils, request, "seed"),
                prior_token_ids=int_list(
                    pb_utils, request, "prior_token_ids", self.preprocessor.limits.max_tokens_limit
                ),
            )
            prepared = self.preprocessor.prepare(raw)
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
                pb_utils.Tensor("gen_prior_tokens", np.array([prepared.prior_tokens], dtype=np.int32)),
            ]
        except InvalidRequest as exc:
            # The control plane tells client errors from node faults by this prefix (a node
            # fault counts against the node's circuit breaker; a bad request must not).
            return self._error(CLIENT_ERROR_PREFIX + str(exc), pb_utils.TritonError.INVALID_ARG)
        except Exception as exc:  # a bug, not the client's fault: say so, keep serving
            return self._error(f"preprocessing failed: {exc!r}", pb_utils.TritonError.INTERNAL)
        return pb_utils.InferenceResponse(output_tensors=outputs)

    @staticmethod
    def _error(message: str, code: Any) -> Any:
        return pb_utils.InferenceResponse(
            output_tensors=[], error=pb_utils.TritonError(error_text(message), code)
        )

    def finalize(self) -> None:
        unfreeze_at_shutdown()
