"""The names clients see: each Triton model under the name its checkpoint is served as.

LLaVA's web UI picks its prompt format from the model's name (``llava`` gets LLaVA's v0
format, ``llava-v1.5-7b`` the llava-1.5 one), so ``/list_models`` and ``/v1/models`` list a
model under its served name: ``LLAVA_CP_MODEL_ALIASES`` if it names one, else the name
its nodes report (``llava_served_model_info``, derived from the checkpoint by
``llava_node/served_name.py``), else its Triton name. Requests may name a model either way;
everything behind the API (routing, loads, ``requests.model``, metrics) uses the Triton
name, the one tritonclient users call.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from control_plane.fleet.store import WorkerStore

__all__ = ["ServedNames"]


class ServedNames:
    """Served names and Triton model names, both ways (memory only)."""

    def __init__(self, store: WorkerStore, aliases: dict[str, str] | None = None) -> None:
        self.store = store
        self.aliases = dict(aliases or {})

    def name_of(self, model: str) -> str:
        """The name ``model`` is served under.

        Of the names its nodes report, the most common one counts (then the first in order);
        a reported name that is another model's Triton name is ignored (it would hide it)."""
        alias = self.aliases.get(model)
        if alias:
            return alias
        reported: Counter[str] = Counter()
        for worker in self.store.all():
            status = worker.models.get(model)
            if status is not None and status.served_name:
                reported[status.served_name] += 1
        if not reported:
            return model
        known = set(self.store.known_models())
        for name, _count in sorted(reported.items(), key=lambda item: (-item[1], item[0])):
            if name == model or name not in known:
                return name
        return model

    def listed(self, models: Iterable[str]) -> list[str]:
        """The served names of ``models``, sorted, each once."""
        return sorted({self.name_of(m) for m in models})

    def resolve(self, name: str) -> str:
        """The Triton model a request's ``model`` names: a Triton name stays as it is; a
        served name becomes its model (the first in order, if several are served so); an
        unknown name stays as it is (the request then fails as for any unknown model)."""
        known = self.store.known_models()
        if name in known:
            return name
        for model in known:
            if self.name_of(model) == name:
                return model
        for model, alias in self.aliases.items():
            if alias == name:
                return model
        return name
