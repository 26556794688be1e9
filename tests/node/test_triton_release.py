"""The Triton release of the node image (deploy/triton-node.Dockerfile) is the Triton
server that these tests run (from the nvidia-pytriton wheel)."""

from __future__ import annotations

import json
import urllib.request

from llava_node.launcher import TritonNode
from tests.deploy.conftest import ROOT, dockerfile_args
from tests.deploy.test_images import triton_release


def test_the_image_release_is_the_triton_the_tests_run(node: TritonNode) -> None:
    with urllib.request.urlopen(f"{node.http_url}/v2", timeout=5) as r:
        meta = json.loads(r.read())
    assert meta["name"] == "triton"
    release = dockerfile_args(ROOT / "deploy" / "triton-node.Dockerfile")["TRITON_VERSION"]
    assert triton_release(meta["version"]) == release, meta
