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

    def __init__(
        self, store: WorkerStore, aliases: dict[str, str] | None = None, default_model: str = ""
    ) -> None:
        self.store = store
        self.aliases = dict(aliases or {})
        self.default_model = default_model

    def table(self) -> dict[str, str]:
        """Every known model -> the name it is served under.

        A model's name: its alias, else the name most of its nodes report (then the first
        in order), else its Triton name. A name that is another model's Triton name is not
        taken (it would hide that model); a name claimed for several models goes to one
        (the aliased one, then the default model, then the first in order) and the others
        keep their Triton names, so that every model stays reachable under one name."""
        known = self.store.known_models()
        reported: dict[str, Counter[str]] = {m: Counter() for m in known}
        for worker in self.store.all():
            for model, status in worker.models.items():
                if status.served_name and model in reported:
                    reported[model][status.served_name] += 1
        wanted: dict[str, str] = {}
        for model in known:
            names = sorted(reported[model].items(), key=lambda item: (-item[1], item[0]))
            wanted[model] = self.aliases.get(model) or (names[0][0] if names else model)
        taken = set(known)
        table: dict[str, str] = {}
        for model in sorted(known, key=lambda m: (m not in self.aliases, m != self.default_model, m)):
            name = wanted[model]
            if name != model and (name in taken or name in table.values()):
                name = model
            table[model] = name
        return table

    def name_of(self, model: str) -> str:
        """The name ``model`` is served under."""
        return self.table().get(model) or self.aliases.get(model) or model

    def listed(self, models: Iterable[str]) -> list[str]:
        """The served names of ``models``, sorted."""
        table = self.table()
        return sorted({table.get(m, m) for m in models})

    def resolve(self, name: str) -> str:
        """The Triton model a request's ``model`` names: a Triton name stays as it is; a
        served name becomes its model; an unknown name stays as it is (the request then
        fails as for any unknown model)."""
        table = self.table()
        if name in table:
            return name
        for model, served in table.items():
            if served == name:
                return model
        for model, alias in self.aliases.items():
            if alias == name:
                return model
        return name
