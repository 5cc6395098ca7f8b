"""The case type every loader yields: one request plus the probes that judge it."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..requests import EditRequest


@dataclass(frozen=True)
class Probe:
    """A prompt and the answer expected from it."""

    prompt: str
    answer: str


@dataclass
class EditCase:
    """An edit request with its evaluation probes.

    ``rephrases`` should now answer ``request.target_new``; ``neighbors`` are unrelated (or
    same-relation, other-subject) prompts whose answers must not move.
    """

    case_id: str
    request: EditRequest
    rephrases: list[str] = field(default_factory=list)
    neighbors: list[Probe] = field(default_factory=list)
