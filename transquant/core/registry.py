"""Name -> implementation tables for what a config value selects (estimators, groupings, engines).

A new implementation is one definition decorated with ``@REGISTRY.register(name)``; config
validation and the error for an unknown name list what is registered, so neither needs editing.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import TransquantError

T = TypeVar("T")


class Registry(Generic[T]):
    """The implementations one config key can select, in registration order.

    ``register(name, selectable=False)`` adds one that code picks but the config key does not
    accept (PEG's estimator, chosen by ``quant.peg_sites`` rather than ``quant.estimator``).
    """

    def __init__(self, key: str, error: type[Exception] = TransquantError) -> None:
        self.key = key
        self.error = error
        self._entries: dict[str, tuple[T, bool]] = {}

    def register(self, name: str, selectable: bool = True) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.key}={name} is registered twice")
            self._entries[name] = (obj, selectable)
            return obj
        return add

    def __iter__(self) -> Iterator[str]:
        """The names the config key accepts."""
        return (name for name, (_, selectable) in self._entries.items() if selectable)

    def __contains__(self, name: object) -> bool:
        return name in list(self)

    def check(self, name: str) -> None:
        """Raise a one-line ``error`` unless the config key accepts ``name``."""
        if name not in self:
            raise self._unknown(name)

    def __getitem__(self, name: str) -> T:
        """The implementation registered as ``name`` (selectable or not)."""
        if name not in self._entries:
            raise self._unknown(name)
        return self._entries[name][0]

    def _unknown(self, name: str) -> Exception:
        return self.error(f"{self.key}={name}: allowed {', '.join(self)}")
