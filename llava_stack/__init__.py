"""The main job: local Triton nodes and the control plane, until Ctrl-C (``python -m llava_stack``).

It stands above both packages: it starts nodes with ``llava_node``'s launcher and runs
the control plane as its own process (``python -m control_plane serve``), so that the
control plane's process imports no torch, transformers or node code.
"""
