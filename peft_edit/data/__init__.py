"""Loaders for knowledge-editing benchmark files; each yields :class:`EditCase` objects.

``load_cases("FORMAT:PATH_OR_HUB_ID")`` reads any of :data:`FORMATS`; the per-format loaders
below do the same for a local file. ``load_known_facts`` and ``load_piqa`` read control sets
that are not edits.
"""

from .cases import EditCase, Probe
from .controls import PiqaExample, load_known_facts, load_piqa
from .counterfact import load_counterfact
from .knowedit import load_knowedit, load_knowedit_convsent, load_knowedit_wikibio
from .loading import FORMATS, detect_format, load_cases
from .mquake import load_mquake
from .records import MalformedRecordError, SubjectNotInPromptError
from .wise import load_hallucination, load_temporal
from .zsre import load_zsre

__all__ = [
    "FORMATS",
    "EditCase",
    "MalformedRecordError",
    "PiqaExample",
    "Probe",
    "SubjectNotInPromptError",
    "detect_format",
    "load_cases",
    "load_counterfact",
    "load_hallucination",
    "load_knowedit",
    "load_knowedit_convsent",
    "load_knowedit_wikibio",
    "load_known_facts",
    "load_mquake",
    "load_piqa",
    "load_temporal",
    "load_zsre",
]
