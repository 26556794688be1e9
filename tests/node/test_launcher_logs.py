"""A node's server log stays where the caller asked once the node is stopped (issue 20:
the dev stack printed log paths that Ctrl-C then deleted)."""

from __future__ import annotations

from pathlib import Path

from llava_node.launcher import TritonNode, TritonNodeConfig


def test_the_server_log_outlives_the_node_when_a_log_dir_is_given(tmp_path: Path) -> None:
    repository = tmp_path / "empty-repository"  # no models: the server is ready at once
    repository.mkdir()
    node = TritonNode(
        TritonNodeConfig(model_repository=repository, model_control="explicit", log_dir=tmp_path / "logs")
    )
    node.start()
    try:
        work_dir, log_path = node.work_dir, node.log_path
        assert log_path.parent == tmp_path / "logs"
    finally:
        node.stop()
    assert not work_dir.exists()  # the temporary work directory goes ...
    assert log_path.exists() and "Started HTTPService" in log_path.read_text(
        errors="replace"
    )  # ... the log stays
