"""Names a package exports without importing their modules until first use (PEP 562 `__getattr__`).

`backbones` and `ensemble` export Keras-heavy names; importing the package for its light names (errors,
the registry) must not import TensorFlow, so those names load on first access.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Mapping


def lazy_exports(package: str, names: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The `__getattr__` and `__dir__` of `package`, loading each of `names` (name -> module) on first access.

    >>> import types
    >>> sys.modules["demo_pkg"] = demo = types.ModuleType("demo_pkg")
    >>> demo.__getattr__, demo.__dir__ = lazy_exports("demo_pkg", {"dedent": "textwrap"})
    >>> demo.dedent("  x")
    'x'
    >>> "dedent" in vars(demo), "dedent" in dir(demo)
    (True, True)
    >>> demo.missing
    Traceback (most recent call last):
    AttributeError: module 'demo_pkg' has no attribute 'missing'
    >>> del sys.modules["demo_pkg"]
    """
    namespace = vars(sys.modules[package])

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = namespace[name] = getattr(importlib.import_module(names[name]), name)
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__
