"""Method registry: maps a spec's ``method.name`` to an ``SSLMethod`` class.

The platform knows methods only through this registry and the protocol in :mod:`methods.base`. ``method.name`` is

* a built-in method's name, listed once in :data:`BUILTIN_METHODS` (``name -> "module:Class"``; a module is imported
  the first time its method is asked for, so importing one method does not import them all), or
* a plug-in path ``package.module:ClassName``: any importable subclass of :class:`methods.base.SSLMethod`, e.g. a
  class in the user's own package. Workers import it the same way: the job's working directory (``ray job submit
  --working-dir``) or the submitting directory (a local run) is on their ``sys.path``.

A missing module or class, or a class that is not an ``SSLMethod``, is a :class:`MethodNotFound` (``KeyError``)
that names what was looked for.
"""

from __future__ import annotations

import importlib
import re

from methods.base import SSLMethod

BUILTIN_METHODS: dict[str, str] = {
    "mae": "methods.mae:MAE",
    "dino": "methods.dino:DINO",
    "ibot": "methods.ibot:iBOT",
    "salt": "methods.salt:SALT",
    "data2vec": "methods.data2vec:Data2Vec",
    "apl": "methods.apl:APL",
    "simclr": "methods.simclr:SimCLR",
    "byol": "methods.byol:BYOL",
    "mocov3": "methods.mocov3:MoCoV3",
    "vicreg": "methods.vicreg:VICReg",
    "barlow_twins": "methods.barlow_twins:BarlowTwins",
    "ijepa": "methods.ijepa:IJEPA",
    "dinov2": "methods.dinov2:DINOv2",
}

_PLUGIN_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


class MethodNotFound(KeyError):
    """``method.name`` names no built-in method and no importable ``SSLMethod`` class."""

    def __str__(self) -> str:  # KeyError quotes its argument; the message reads better plain
        return str(self.args[0])


def is_plugin_path(name: str) -> bool:
    """``package.module:ClassName``."""
    return isinstance(name, str) and bool(_PLUGIN_PATH.match(name))


def available_methods() -> list[str]:
    """The built-in methods' names."""
    return sorted(BUILTIN_METHODS)


def _load(path: str, name: str) -> type[SSLMethod]:
    module_name, _, class_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):  # the module itself (or a parent package) is missing
            raise MethodNotFound(f"method {name!r}: no module {module_name!r} on the Python path "
                                 f"(a plug-in is 'package.module:ClassName', importable from the working directory)") from None
        raise MethodNotFound(f"method {name!r}: importing module {module_name!r} failed: {type(e).__name__}: {e}") from e
    except Exception as e:  # a broken plug-in: its import raised
        raise MethodNotFound(f"method {name!r}: importing module {module_name!r} failed: {type(e).__name__}: {e}") from e
    cls = getattr(module, class_name, None)
    if cls is None:
        raise MethodNotFound(f"method {name!r}: module {module_name!r} has no {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, SSLMethod)):
        raise MethodNotFound(f"method {name!r}: {path} is {cls!r}, not a subclass of methods.base.SSLMethod")
    if not cls.__dict__.get("method_name"):
        cls.method_name = name  # what checkpoints record as the method that trained them
    return cls


def get_method_class(name: str) -> type[SSLMethod]:
    """The class of a built-in name or a ``package.module:ClassName`` plug-in path."""
    if name in BUILTIN_METHODS:
        return _load(BUILTIN_METHODS[name], name)
    if is_plugin_path(name):
        return _load(name, name)
    raise MethodNotFound(f"unknown method {name!r}; expected one of {available_methods()} or a plug-in path "
                         "'package.module:ClassName'")


def build_method(name: str, **kwargs) -> SSLMethod:
    """Instantiate a method from keyword arguments named as in its constructor."""
    return get_method_class(name)(**kwargs)
