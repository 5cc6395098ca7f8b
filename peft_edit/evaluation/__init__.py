"""Scoring edits the ways the field reports them: metrics, protocols (single, batch, sequential), reports.

``evaluate(model, tokenizer, "counterfact:cf.json", method="rome", protocol="single", limit=100)``
returns an :class:`EvaluationResult`: ``summary`` (metric -> number), ``baseline`` (the unedited
model's scores), ``records`` (per case) and, for the sequential protocol, ``curve``.
"""

from .protocols import PROTOCOLS, EvaluationResult, Reference, evaluate, pre_edit_reference
from .restore import RestoreError
from .scoring import METRICS, ScoreSettings

__all__ = [
    "METRICS",
    "PROTOCOLS",
    "EvaluationResult",
    "Reference",
    "RestoreError",
    "ScoreSettings",
    "evaluate",
    "pre_edit_reference",
]
