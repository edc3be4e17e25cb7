"""Method registry: maps a spec's ``method.name`` to an ``SSLMethod`` class.

The platform knows methods only through this registry and the protocol in :mod:`methods.base`.
"""

from __future__ import annotations

import importlib

from methods.base import SSLMethod

_REGISTRY: dict[str, type[SSLMethod]] = {}

# The built-in methods' modules, imported the first time the registry is queried (so that importing one method
# does not import them all); each registers its class with ``@register``. A module that fails to import is an error.
_METHOD_MODULES = ("methods.mae", "methods.dino", "methods.ibot", "methods.salt", "methods.data2vec", "methods.apl")
_loaded = False


def register(name: str):
    """Class decorator: ``@register("mae") class MAE(SSLMethod): ...``."""

    def wrap(cls: type[SSLMethod]) -> type[SSLMethod]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.method_name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for module in _METHOD_MODULES:
        importlib.import_module(module)
    _loaded = True


def available_methods() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[SSLMethod]:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; expected one of {sorted(_REGISTRY)}") from None


def build_method(name: str, **kwargs) -> SSLMethod:
    """Instantiate a registered method from keyword arguments named as in its constructor."""
    return get_method_class(name)(**kwargs)
