"""HTTP APIs, one module per family: ``llava`` (controller protocol), ``admin``, ``openai``."""
