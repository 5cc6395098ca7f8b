"""KnowEdit (Zhang et al. 2024): ZsRE, wiki_counterfact, wiki_recent, WikiBio and ConvSent.

ZsRE, wiki_counterfact and wiki_recent share one schema: ``subject``, ``prompt``,
``target_new``, ``ground_truth`` (a string, a list of answers, or absent in wiki_recent), an
optional rephrase (``rephrase_prompt`` or ``rephrase``), and two groups of probes keyed by kind:

* ``portability`` (``Reasoning``, ``Logical_Generalization``, ``Subject_Aliasing``) →
  :attr:`EditCase.portability`, answered with the post-edit answer;
* ``locality`` (``Relation_Specificity``, ``Forgetfulness``) → :attr:`EditCase.neighbors`.

Answers come as a string, a list of strings or (wiki_recent) a list of answers each given as a
list of aliases; a probe's answer is the first alias of the first answer
(:meth:`Record.answer`); a probe whose answer holds no text at all is left out.
A subject the prompt spells differently is handled as in zsRE (:mod:`peft_edit.data.zsre`):
in the ZsRE test file two records take the prompt's spelling and one is skipped with a warning.

WikiBio edits a passage (``text``) about ``concept`` to continue with the sentence ``labels``.

ConvSent edits the sentiment of a dialogue model toward an entity (``ent``): ``pos`` and ``neg``
are responses expressing each sentiment; the file has no prompts. A case asks "What do you
think of {ent}?" and writes the first response of the chosen sentiment (positive by default),
with the first opposite response as the answer it replaces, so the probability comparison reads
"does the model now prefer the new sentiment". Two other opinion questions are the rephrases
(judged the same way) and all three are the generation prompts, for a sentiment classifier on
free generation, the measure the ConvSent papers report. The file holds no locality probes:
opinion prompts about the entities of other cases serve that purpose.
"""

from __future__ import annotations

import os
from functools import partial

from .cases import EditCase, Probe
from .records import MalformedRecordError, Record, load_file, make_request, probe_of

OPINION_TEMPLATES = ("What do you think of {}?", "What do you feel about {}?", "How do you view {}?")
SENTIMENTS = ("positive", "negative")


def _probes(record: Record, group: str) -> list[Probe]:
    """Every probe of the ``locality`` or ``portability`` group, over all its kinds, in file order."""
    probes = []
    for kind in record.mapping(group, required=False):
        for entry in record.children(f"{group}.{kind}", required=False):
            probes += probe_of(entry, "prompt", "ground_truth")
    return probes


def _rephrases(record: Record) -> list[str]:
    return record.text_or_texts("rephrase_prompt") or record.text_or_texts("rephrase")


def parse_knowedit(
    record: Record, ground_truth_required: bool = True, rephrase_required: bool = False
) -> EditCase:
    """A KnowEdit ZsRE / wiki_counterfact / wiki_recent record."""
    request = make_request(
        record,
        prompt=record.text("prompt"),
        subject=record.text("subject"),
        target_new=record.text("target_new"),
        target_true=record.answer("ground_truth", required=ground_truth_required),
        subject_may_differ=True,
    )
    rephrases = _rephrases(record)
    if rephrase_required and not rephrases:
        raise MalformedRecordError(f"{record.where}: missing field 'rephrase_prompt'.")
    return EditCase(
        case_id=record.case_id(),
        request=request,
        rephrases=rephrases,
        neighbors=_probes(record, "locality"),
        portability=_probes(record, "portability"),
    )


parse_knowedit_zsre = partial(parse_knowedit, ground_truth_required=True, rephrase_required=True)
parse_knowedit_wiki_counterfact = partial(parse_knowedit, ground_truth_required=True)
parse_knowedit_wiki_recent = partial(parse_knowedit, ground_truth_required=False)


def parse_knowedit_wikibio(record: Record) -> EditCase:
    request = make_request(
        record, prompt=record.text("text"), subject=record.text("concept"), target_new=record.text("labels")
    )
    return EditCase(case_id=record.case_id(), request=request, neighbors=_probes(record, "locality"))


def parse_knowedit_convsent(record: Record, sentiment: str = "positive") -> EditCase:
    if sentiment not in SENTIMENTS:
        raise ValueError(f"sentiment must be one of {SENTIMENTS}, got {sentiment!r}.")
    wanted, opposite = ("pos", "neg") if sentiment == "positive" else ("neg", "pos")
    new_responses = record.texts(wanted)
    if not new_responses:
        raise record.error(wanted, f"is an empty list; a {sentiment} edit needs at least one response.")
    old_responses = record.texts(opposite)
    entity = record.text("ent")
    request = make_request(
        record,
        prompt=OPINION_TEMPLATES[0],
        subject=entity,
        target_new=new_responses[0].strip(),
        target_true=old_responses[0].strip() if old_responses else None,
    )
    questions = [template.replace("{}", entity) for template in OPINION_TEMPLATES]
    return EditCase(
        case_id=record.case_id(), request=request, rephrases=questions[1:], generation_prompts=questions
    )


def load_knowedit(path: str | os.PathLike, limit: int | None = None) -> list[EditCase]:
    """Read a KnowEdit ZsRE, wiki_counterfact or wiki_recent file (their shared schema)."""
    return load_file(path, parse_knowedit_wiki_recent, limit)


def load_knowedit_wikibio(path: str | os.PathLike, limit: int | None = None) -> list[EditCase]:
    """Read KnowEdit's WikiBio file (``text`` continued by ``labels``)."""
    return load_file(path, parse_knowedit_wikibio, limit)


def load_knowedit_convsent(
    path: str | os.PathLike, limit: int | None = None, sentiment: str = "positive"
) -> list[EditCase]:
    """Read KnowEdit's ConvSent file; each case writes a ``sentiment`` opinion about its entity."""
    return load_file(path, partial(parse_knowedit_convsent, sentiment=sentiment), limit)
