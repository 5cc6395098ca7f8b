"""Edit requests: what to change, validated before any model is touched.

An :class:`EditRequest` names a subject, a prompt about it and the new answer. The prompt comes in
either of the two forms used in the field:

* the ROME form, with ``{}`` where the subject goes: ``"{} is located in the city of"``;
* the EasyEdit form, a full sentence containing the subject verbatim:
  ``"The Eiffel Tower is located in the city of"``.

Both are normalised to the ROME form (:attr:`EditRequest.template`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

PLACEHOLDER = "{}"


@dataclass(frozen=True)
class EditRequest:
    """One fact to write into a model.

    Args:
        prompt: ``"{} is located in the city of"`` or ``"The Eiffel Tower is located in the city of"``.
        subject: the entity the fact is about, e.g. ``"The Eiffel Tower"``.
        target_new: the answer the edited model should give, e.g. ``"Rome"``.
        target_true: the answer the model gives before the edit (optional; used by evaluation).
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    def __post_init__(self) -> None:
        for name in ("prompt", "subject", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"EditRequest.{name} must be a string, got {type(value).__name__}.")
            if not value.strip():
                raise ValueError(f"EditRequest.{name} is empty; give the text to edit (got {value!r}).")
        if self.target_true is not None:
            if not isinstance(self.target_true, str):
                raise TypeError(f"EditRequest.target_true must be a string or None, got {type(self.target_true).__name__}.")
            if not self.target_true.strip():
                raise ValueError("EditRequest.target_true is empty; leave it out (None) or give the current answer.")
            if self.target_true.strip() == self.target_new.strip():
                raise ValueError(
                    f"EditRequest.target_new equals target_true ({self.target_new!r}): the edit would change nothing."
                )
        count = self.prompt.count(PLACEHOLDER)
        if count > 1:
            raise ValueError(
                f"EditRequest.prompt has {count} '{{}}' placeholders ({self.prompt!r}); use exactly one, where the "
                "subject goes."
            )
        if count == 0 and self.subject not in self.prompt:
            raise ValueError(
                f"EditRequest.subject {self.subject!r} does not occur in the prompt {self.prompt!r}. Either write the "
                "prompt with '{}' where the subject goes, or include the subject in it verbatim."
            )

    @property
    def template(self) -> str:
        """The prompt with ``{}`` in place of the (first occurrence of the) subject."""
        if PLACEHOLDER in self.prompt:
            return self.prompt
        return self.prompt.replace(self.subject, PLACEHOLDER, 1)

    @property
    def filled_prompt(self) -> str:
        """The prompt with the subject written in."""
        return fill(self.template, self.subject)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditRequest:
        known = {"prompt", "subject", "target_new", "target_true"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Unknown EditRequest fields {sorted(unknown)}; expected some of {sorted(known)}.")
        return cls(**data)


def fill(template: str, subject: str) -> str:
    """Put ``subject`` where ``{}`` is (``str.format`` would choke on other braces in the text)."""
    return template.replace(PLACEHOLDER, subject, 1)


def as_requests(requests: EditRequest | dict | Iterable[EditRequest | dict]) -> list[EditRequest]:
    """Accept one request or many, as objects or dicts; return a non-empty list of EditRequest."""
    if isinstance(requests, (EditRequest, dict)):
        requests = [requests]
    out = [r if isinstance(r, EditRequest) else EditRequest.from_dict(dict(r)) for r in requests]
    if not out:
        raise ValueError("No edit requests given; pass at least one EditRequest.")
    return out


def join_prompt_and_target(prompt: str, target: str) -> str:
    """The text a model should produce: the prompt, then the target after exactly one space."""
    if prompt.endswith((" ", "\n")) or target.startswith((" ", "\n")):
        return prompt + target
    return prompt + " " + target


def tokenize_continuation(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` and of ``target`` as the model would see it right after the prompt.

    The target is tokenized in context (``prompt + " " + target``) and split off at the prompt's
    tokens, so the leading-space convention of the tokenizer (BPE ``Ġ``, SentencePiece ``▁``) is
    whatever the tokenizer itself does after that prompt.
    """
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(join_prompt_and_target(prompt, target))["input_ids"]
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        return list(prompt_ids), list(full_ids[len(prompt_ids) :])
    # The tokenizer merged across the boundary (rare with a space between): tokenize the target
    # alone, without special tokens, keeping the leading space.
    target_ids = tokenizer(" " + target.lstrip(), add_special_tokens=False)["input_ids"]
    if not target_ids:
        raise ValueError(f"The target {target!r} tokenizes to nothing; give a non-empty answer.")
    return list(prompt_ids), list(target_ids)


def subject_last_token_index(tokenizer, template: str, subject: str) -> int:
    """Index of the subject's last token in the tokenized filled-in prompt."""
    before, _, _ = template.partition(PLACEHOLDER)
    ids = tokenizer(before + subject)["input_ids"]
    return len(ids) - 1


def check_requests_tokenize(tokenizer, requests: Sequence[EditRequest]) -> None:
    """Fail early, before a model is changed, if a request cannot be tokenized sensibly."""
    for i, req in enumerate(requests):
        prompt_ids, target_ids = tokenize_continuation(tokenizer, req.filled_prompt, req.target_new)
        if not target_ids:
            raise ValueError(f"Request {i}: target_new {req.target_new!r} tokenizes to nothing.")
        last = subject_last_token_index(tokenizer, req.template, req.subject)
        if last >= len(prompt_ids):
            raise ValueError(f"Request {i}: could not locate the subject {req.subject!r} in the tokenized prompt.")
