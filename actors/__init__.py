"""Baton's workers and the engine they run.

`Engine` is imported lazily: it pulls in torch and transformers.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from baton.actors.engine import Engine, EngineConfig

__all__ = ["Engine", "EngineConfig"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from baton.actors import engine

        return getattr(engine, name)
    raise AttributeError(name)
