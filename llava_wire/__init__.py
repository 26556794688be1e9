"""The contract between the control plane and the nodes: the ``llava`` ensemble's interface
(tensor, step and metric names, finish reasons, the client-error prefix), building its
requests and reading its responses, and a helper both kinds of server process use.

Torch-free by design (NumPy and tritonclient are enough): ``control_plane`` imports only
this of the node side, and ``llava_node`` imports it too; neither imports the other.
"""
