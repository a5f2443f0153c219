"""A name -> class registry, so that adding a policy is one class and one decorator."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, type[T]] = {}

    def register(self, name: str):
        def deco(cls: type[T]) -> type[T]:
            if name in self._classes:
                raise ValueError(f"{self.kind} policy {name!r} registered twice")
            self._classes[name] = cls
            cls.name = name  # type: ignore[attr-defined]
            return cls

        return deco

    def get(self, name: str) -> type[T]:
        try:
            return self._classes[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} policy {name!r}; choose one of {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._classes)

    def __contains__(self, name: str) -> bool:
        return name in self._classes
