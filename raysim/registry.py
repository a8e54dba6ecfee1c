"""Name → implementation registries, keyed by the names scenario YAML uses.

Each plugin family (models, strategies, codecs, ...) owns one :class:`Registry`.
An entry pairs a factory with a frozen pydantic config class whose ``name``
field is a ``Literal`` of the registered name, so the scenario schema can be a
discriminated union built from the registry itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Callable, Generic, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class PluginConfig(BaseModel):
    """Base of a plugin's config: frozen, and unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    config: type[BaseModel]
    factory: Callable[..., T]


class Registry(Generic[T]):
    """A registry of one plugin family, e.g. ``Registry("model")``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, config: type[BaseModel]) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering ``factory`` under ``name`` with its config class."""

        def decorate(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, config, factory)
            return factory

        return decorate

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}") from None

    def build(self, config: BaseModel, *args: Any, **kwargs: Any) -> T:
        """Build the implementation for ``config`` (its ``name`` picks the entry)."""
        return self.entry(config.name).factory(config, *args, **kwargs)  # type: ignore[attr-defined]

    def config_union(self) -> Any:
        """A pydantic type accepting any registered config, discriminated by ``name``."""
        configs = tuple(entry.config for entry in self._entries.values())
        if len(configs) == 1:
            return configs[0]
        return Annotated[Union[configs], Field(discriminator="name")]  # type: ignore[valid-type]
