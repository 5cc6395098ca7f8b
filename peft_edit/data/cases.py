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

    * ``rephrases`` should now answer ``request.target_new`` (generalization);
    * ``neighbors`` are unrelated (or same-relation, other-subject) prompts whose answers must not
      move (locality); ``Probe.answer`` is the answer they should keep;
    * ``portability`` probes ask for a consequence of the edit (a one-hop question, an alias of
      the subject, a multi-hop question); ``Probe.answer`` is the answer *after* the edit;
    * ``generation_prompts`` seed free generation for fluency and consistency;
    * ``extra_requests`` are edits applied together with ``request`` (a MQuAKE case holds
      several); most cases have none.
    """

    case_id: str
    request: EditRequest
    rephrases: list[str] = field(default_factory=list)
    neighbors: list[Probe] = field(default_factory=list)
    portability: list[Probe] = field(default_factory=list)
    generation_prompts: list[str] = field(default_factory=list)
    extra_requests: list[EditRequest] = field(default_factory=list)

    @property
    def requests(self) -> list[EditRequest]:
        """Every edit the case asks for, ``request`` first."""
        return [self.request, *self.extra_requests]
