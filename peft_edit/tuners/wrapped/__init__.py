"""Shared base for edit adapters that wrap a module and keep its weights (GRACE, WISE, T-Patcher, ...).

See :mod:`peft_edit.tuners.wrapped.layer` for how a method plugs in.
"""

from .layer import CannotMergeError, WrappedLayer
from .model import WrappedTuner

__all__ = ["CannotMergeError", "WrappedLayer", "WrappedTuner"]
