"""Edit requests: what to change, validated before any model is touched.

An :class:`EditRequest` names a subject, a prompt about it and the new answer. The prompt comes in
either of the two forms used in the field:

* the ROME form, with ``{}`` where the subject goes: ``"{} is located in the city of"``;
* the EasyEdit form, a full sentence containing the subject verbatim:
  ``"The Eiffel Tower is located in the city of"``.

Both are normalised to the ROME form (:attr:`EditRequest.template`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
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
                raise TypeError(
                    f"EditRequest.target_true must be a string or None, got {type(self.target_true).__name__}."
                )
            if not self.target_true.strip():
                raise ValueError(
                    "EditRequest.target_true is empty; leave it out (None) or give the current answer."
                )
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

    @property
    def fact(self) -> tuple[str, str]:
        """What the request is about (subject, prompt template): two requests about one fact with
        different targets contradict each other."""
        return (self.subject.strip(), " ".join(self.template.split()))

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EditRequest:
        if not isinstance(data, Mapping):
            raise TypeError(
                "An edit request must be an EditRequest or a dict with the fields prompt, subject, target_new "
                f"(and optionally target_true); got {type(data).__name__}: {data!r}."
            )
        known = {"prompt", "subject", "target_new", "target_true"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"Unknown EditRequest fields {sorted(unknown)}; expected some of {sorted(known)}."
            )
        missing = {"prompt", "subject", "target_new"} - set(data)
        if missing:
            raise ValueError(
                f"EditRequest is missing the fields {sorted(missing)} (got {sorted(data)}); prompt, subject and "
                "target_new are required."
            )
        return cls(**data)


def fill(template: str, subject: str) -> str:
    """Put ``subject`` where ``{}`` is (``str.format`` would choke on other braces in the text)."""
    return template.replace(PLACEHOLDER, subject, 1)


def as_requests(requests: EditRequest | Mapping | Iterable[EditRequest | Mapping]) -> list[EditRequest]:
    """Accept one request or many, as objects or dicts; return a non-empty list of EditRequest."""
    if isinstance(requests, (EditRequest, Mapping)):
        requests = [requests]
    elif isinstance(requests, (str, bytes)) or not isinstance(requests, Iterable):
        raise TypeError(
            f"Expected an EditRequest, a dict, or a list of them; got {type(requests).__name__}: {requests!r}."
        )
    out = [r if isinstance(r, EditRequest) else EditRequest.from_dict(r) for r in requests]
    if not out:
        raise ValueError("No edit requests given; pass at least one EditRequest.")
    return out


def _split_prompt_and_target(prompt: str, target: str) -> tuple[str, str]:
    """(prompt part, target part) of the text a model should produce; see :func:`join_prompt_and_target`."""
    if target.startswith("\n"):
        return prompt, target
    head = prompt.rstrip(" ")
    target = target.lstrip(" ")
    if not head or head.endswith("\n"):
        return head, target
    return head, " " + target


def generation_prompt(prompt: str) -> str:
    """The text a continuation of ``prompt`` is generated from: the prompt without its trailing spaces.

    :func:`tokenize_continuation` moves those spaces into the target's first token, as the
    tokenizer would (``"... merican. "`` + ``"Datuk"`` is ``"... merican."`` + ``" Datuk"``);
    generating after a lone space token instead asks for a context no edit was made in.
    """
    return prompt.rstrip(" ") or prompt


def join_prompt_and_target(prompt: str, target: str) -> str:
    """The text a model should produce: the prompt, then the target after exactly one space.

    Spaces at the end of the prompt or the start of the target are not doubled (``"of "`` +
    ``" Rome"`` gives ``"of Rome"``); after a prompt that ends a line no space is added.
    """
    head, tail = _split_prompt_and_target(prompt, target)
    return head + tail


def tokenize_continuation(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` and of ``target`` as the model would see it right after the prompt.

    The target is tokenized in context (``prompt + " " + target``) and split off at the prompt's
    tokens, so the leading-space convention of the tokenizer (BPE ``Ġ``, SentencePiece ``▁``) is
    whatever the tokenizer itself does after that prompt. Spaces at the end of the prompt go with
    the target's first token, as the tokenizer would have them, so the prompt ids are those of the
    prompt without its trailing spaces.
    """
    head, tail = _split_prompt_and_target(prompt, target)
    prompt_ids = tokenizer(head)["input_ids"]
    full_ids = tokenizer(head + tail)["input_ids"]
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        return list(prompt_ids), list(full_ids[len(prompt_ids) :])
    # The tokenizer merged across the boundary (rare with a space between): tokenize the target
    # alone, without special tokens, keeping the leading space.
    target_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    if not target_ids:
        raise ValueError(f"The target {target!r} tokenizes to nothing; give a non-empty answer.")
    return list(prompt_ids), list(target_ids)


def subject_last_token_index(tokenizer, template: str, subject: str) -> int:
    """Index of the subject's last token in the tokenized filled-in prompt.

    That is the token holding the subject's last character. With a fast tokenizer it is found
    from the character offsets of the whole prompt, so it stays right when the tokenizer merges
    the subject's end with the text after it ("Northumbria" + "'s" as one token); otherwise it is
    the last token of the text up to the end of the subject (ROME's rule).
    """
    before, _, _ = template.partition(PLACEHOLDER)
    end = len(before) + len(subject)
    try:
        offsets = tokenizer(fill(template, subject), return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):  # slow tokenizers have no offsets
        offsets = None
    if offsets:
        # Special tokens (BOS) have empty spans; the last token starting before `end` holds the subject's end.
        covering = [i for i, (start, stop) in enumerate(offsets) if stop > start and start < end]
        if covering:
            return covering[-1]
    ids = tokenizer(before + subject)["input_ids"]
    return len(ids) - 1


def pad_token_id(tokenizer) -> int:
    """The id used to pad batches: the tokenizer's pad token, else its end-of-sequence token."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has neither a pad nor an eos token; set tokenizer.pad_token.")
    return tokenizer.eos_token_id


def check_requests_tokenize(tokenizer, requests: Sequence[EditRequest]) -> None:
    """Fail early, before a model is changed, if a request cannot be tokenized sensibly."""
    for i, req in enumerate(requests):
        prompt_ids, target_ids = tokenize_continuation(tokenizer, req.filled_prompt, req.target_new)
        if not target_ids:
            raise ValueError(f"Request {i}: target_new {req.target_new!r} tokenizes to nothing.")
        last = subject_last_token_index(tokenizer, req.template, req.subject)
        if last >= len(prompt_ids):
            raise ValueError(
                f"Request {i}: could not locate the subject {req.subject!r} in the tokenized prompt."
            )
