"""Loaders for knowledge-editing benchmark files; each yields :class:`EditCase` objects."""

from .cases import EditCase, Probe
from .counterfact import load_counterfact

__all__ = ["EditCase", "Probe", "load_counterfact"]
