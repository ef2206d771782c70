"""Let a submodule that shares its name with the function it exports be called like it.

``prunepath`` exports ``convert``, ``budget`` and ``calibrate`` lazily from the modules
``prunepath.convert``, ``prunepath.budget`` and ``prunepath.calibrate``. Importing such a
submodule (``import prunepath.convert``, or any ``from .convert import ...``) binds the
*module* to the package attribute, which then shadows the function. Making the module
callable (forwarding to the function) keeps ``prunepath.convert(model, cfg)`` working
whichever of the two the attribute holds.
"""

from __future__ import annotations

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)


def make_module_callable(module_name: str) -> None:
    """Make ``sys.modules[module_name]`` callable as its same-named function."""
    sys.modules[module_name].__class__ = _CallableModule
