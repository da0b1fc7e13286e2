"""A registry of network factories, as timm keeps one: ``@register_model`` on a factory function,
``create_model(name, **config)`` to build one, ``list_models()`` to see them.

Factories live in one module per architecture family (``scopestream.models.motion.sran``, ...);
the registry imports a family's module only when one of its models is asked for, so importing
:mod:`scopestream.models` never imports torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["create_model", "list_models", "register_model"]

_FACTORIES: dict[str, Callable[..., Any]] = {}

# Model name -> the module that registers it (imported on first use).
_FAMILIES: dict[str, str] = {
    "sran": "scopestream.models.motion.sran",
    "track_mlp": "scopestream.models.motion.track_mlp",
    "fused": "scopestream.models.motion.fused",
    "stack_cnn": "scopestream.models.diffusion.stack_cnn",
    "locnet": "scopestream.models.localize.locnet",
}


def register_model(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: register ``fn`` under its ``__name__`` as a model factory."""
    _FACTORIES[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names of every model that :func:`create_model` can build."""
    return sorted(set(_FACTORIES) | set(_FAMILIES))


def create_model(name: str, **config: Any) -> Any:
    """Build the model ``name`` from keyword ``config`` (a ``torch.nn.Module``).

    Raises
    ------
    KeyError
        Naming the known models, for an unknown name.
    """
    if name not in _FACTORIES and name in _FAMILIES:
        importlib.import_module(_FAMILIES[name])
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; models are {list_models()}") from None
    return factory(**config)
