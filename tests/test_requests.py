"""EditRequest: the two prompt forms, validation messages, and tokenization helpers."""

from __future__ import annotations

import pytest
from tiny_models import TOKENIZER_KINDS, tiny_tokenizer

from peft_edit.requests import (
    EditRequest,
    as_requests,
    check_requests_tokenize,
    fill,
    join_prompt_and_target,
    subject_last_token_index,
    tokenize_continuation,
)

EIFFEL = {
    "prompt": "{} is located in the city of",
    "subject": "The Eiffel Tower",
    "target_new": "Rome",
    "target_true": "Paris",
}

# (template, subject, target): subjects at the start, in the middle and at the end; targets of
# one and of several tokens, with accents (byte fallback) and with a leading space.
CASES = [
    ("{} is located in the city of", "The Eiffel Tower", "Rome"),
    ("{} is located in the city of", "The Eiffel Tower", " Rome"),
    ("The mother tongue of {} is", "Danielle Darrieux", "English"),
    ("In the summer, {} plays the", "Toko Yasuda", "naïve café music"),
    ("{}'s religious values strongly emphasize", "Edwin of Northumbria", "Islam"),
    ("Which city is {} located in? It is located in", "the Space Needle", "Seattle, Washington"),
]


@pytest.fixture(params=TOKENIZER_KINDS)
def tokenizer(request):
    return tiny_tokenizer(request.param)


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------
# The two prompt forms
# ----------------------------------------------------------------------------------------------


def test_both_prompt_forms_give_the_same_template_and_filled_prompt():
    rome_form = EditRequest(**EIFFEL)
    easyedit_form = EditRequest(**{**EIFFEL, "prompt": "The Eiffel Tower is located in the city of"})
    assert rome_form.template == easyedit_form.template == "{} is located in the city of"
    assert (
        rome_form.filled_prompt == easyedit_form.filled_prompt == "The Eiffel Tower is located in the city of"
    )


def test_subject_in_the_middle_and_only_first_occurrence_is_replaced():
    req = EditRequest(prompt="Where is Paris? Paris is in", subject="Paris", target_new="Italy")
    assert req.template == "Where is {}? Paris is in"
    assert req.filled_prompt == "Where is Paris? Paris is in"


def test_other_braces_in_the_prompt_are_kept():
    req = EditRequest(prompt="In {set} notation, {} is", subject="x", target_new="an element")
    assert req.filled_prompt == "In {set} notation, x is"
    assert fill("{} and {}", "a") == "a and {}"


def test_target_true_is_optional_and_to_dict_round_trips():
    req = EditRequest(prompt="{} plays", subject="Michael Jordan", target_new="baseball")
    assert req.target_true is None
    assert req.to_dict() == {"prompt": "{} plays", "subject": "Michael Jordan", "target_new": "baseball"}
    assert EditRequest.from_dict(req.to_dict()) == req
    full = EditRequest(**EIFFEL)
    assert EditRequest.from_dict(full.to_dict()) == full


# ----------------------------------------------------------------------------------------------
# Validation: each error says what to fix
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, error, words",
    [
        ({"prompt": "The tower is located in"}, ValueError, ["subject", "does not occur", "{}"]),
        ({"prompt": "{} is near {} in"}, ValueError, ["2", "placeholder", "exactly one"]),
        ({"prompt": ""}, ValueError, ["prompt", "empty"]),
        ({"prompt": "   "}, ValueError, ["prompt", "empty"]),
        ({"subject": ""}, ValueError, ["subject", "empty"]),
        ({"subject": " \t"}, ValueError, ["subject", "empty"]),
        ({"target_new": ""}, ValueError, ["target_new", "empty"]),
        ({"target_new": "  \n"}, ValueError, ["target_new", "empty"]),
        ({"target_true": " "}, ValueError, ["target_true", "empty", "None"]),
        ({"target_true": "Rome"}, ValueError, ["target_new", "target_true", "change nothing"]),
        ({"target_true": " Rome "}, ValueError, ["target_new", "target_true", "change nothing"]),
        ({"prompt": 3}, TypeError, ["prompt", "string", "int"]),
        ({"subject": None}, TypeError, ["subject", "string", "NoneType"]),
        ({"target_new": ["Rome"]}, TypeError, ["target_new", "string", "list"]),
        ({"target_true": 1.5}, TypeError, ["target_true", "string", "None", "float"]),
    ],
)
def test_invalid_requests_say_what_to_fix(changes, error, words):
    with pytest.raises(error) as info:
        EditRequest(**{**EIFFEL, **changes})
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)


def test_subject_is_matched_verbatim():
    with pytest.raises(ValueError, match="verbatim"):
        EditRequest(prompt="the eiffel tower is in", subject="The Eiffel Tower", target_new="Rome")


def test_from_dict_rejects_unknown_fields_and_names_the_known_ones():
    with pytest.raises(ValueError) as info:
        EditRequest.from_dict({**EIFFEL, "ground_truth": "Paris"})
    message = str(info.value)
    assert "ground_truth" in message
    for field in ("prompt", "subject", "target_new", "target_true"):
        assert field in message


def test_from_dict_names_missing_fields():
    with pytest.raises(ValueError, match=r"missing.*target_new"):
        EditRequest.from_dict({"prompt": "{} is in", "subject": "The Eiffel Tower"})


def test_from_dict_rejects_non_mappings():
    with pytest.raises(TypeError, match="dict"):
        EditRequest.from_dict("The Eiffel Tower is in Rome")


# ----------------------------------------------------------------------------------------------
# as_requests
# ----------------------------------------------------------------------------------------------


def test_as_requests_accepts_one_request_a_dict_and_lists():
    req = EditRequest(**EIFFEL)
    assert as_requests(req) == [req]
    assert as_requests(dict(EIFFEL)) == [req]
    other = {"prompt": "{} plays", "subject": "Michael Jordan", "target_new": "baseball"}
    both = as_requests([req, other])
    assert both == [req, EditRequest(**other)]
    assert as_requests(r for r in (req, other)) == both
    assert as_requests((req,)) == [req]
    assert all(isinstance(r, EditRequest) for r in both)


def test_as_requests_rejects_empty_and_wrong_types():
    with pytest.raises(ValueError, match="at least one"):
        as_requests([])
    with pytest.raises(TypeError, match="EditRequest"):
        as_requests("The Eiffel Tower is in Rome")
    with pytest.raises(TypeError, match="EditRequest"):
        as_requests(42)
    with pytest.raises(TypeError, match="dict"):
        as_requests([EditRequest(**EIFFEL), "Rome"])
    with pytest.raises(ValueError, match="Unknown EditRequest fields"):
        as_requests([{**EIFFEL, "rephrase": "x"}])


# ----------------------------------------------------------------------------------------------
# Joining prompt and target
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, target, text",
    [
        ("The city of", "Rome", "The city of Rome"),
        ("The city of", " Rome", "The city of Rome"),
        ("The city of ", "Rome", "The city of Rome"),
        ("The city of ", " Rome", "The city of Rome"),
        ("Q: Where?\nA:", "Rome", "Q: Where?\nA: Rome"),
        ("Q: Where?\n", "Rome", "Q: Where?\nRome"),
        ("Q: Where?\n", " Rome", "Q: Where?\nRome"),
        ("Q: Where?", "\nRome", "Q: Where?\nRome"),
    ],
)
def test_join_prompt_and_target_uses_exactly_one_space(prompt, target, text):
    assert join_prompt_and_target(prompt, target) == text


# ----------------------------------------------------------------------------------------------
# Tokenization, with both tokenizer conventions (byte-level BPE "Ġ", SentencePiece "▁" + BOS)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("template, subject, target", CASES)
def test_tokenize_continuation(tokenizer, template, subject, target):
    prompt = fill(template, subject)
    prompt_ids, target_ids = tokenize_continuation(tokenizer, prompt, target)
    full_ids = tokenizer(join_prompt_and_target(prompt, target))["input_ids"]
    assert target_ids
    # The target decodes back to itself, and prompt + target is the tokenization of the joined text.
    assert decode(tokenizer, target_ids).strip() == target.strip()
    assert prompt_ids + target_ids == full_ids
    assert full_ids[: len(prompt_ids)] == prompt_ids
    assert prompt_ids == tokenizer(prompt)["input_ids"]
    # Special tokens (BOS) only in front of the prompt, never inside the target.
    assert not set(target_ids) & set(tokenizer.all_special_ids)


@pytest.mark.parametrize("template, subject, target", CASES)
def test_target_with_and_without_leading_space_tokenize_alike(tokenizer, template, subject, target):
    prompt = fill(template, subject)
    bare = tokenize_continuation(tokenizer, prompt, target.lstrip())
    spaced = tokenize_continuation(tokenizer, prompt, " " + target.lstrip())
    assert bare == spaced


def test_target_gets_the_leading_space_marker(tokenizer):
    _, target_ids = tokenize_continuation(tokenizer, "The Eiffel Tower is located in the city of", "Rome")
    first = tokenizer.convert_ids_to_tokens(target_ids[0])
    assert first[0] in ("Ġ", "▁"), first


def test_trailing_space_in_prompt_is_not_doubled(tokenizer):
    prompt = "The Eiffel Tower is located in the city of"
    expected = tokenize_continuation(tokenizer, prompt, "Rome")
    for p, t in [(prompt + " ", "Rome"), (prompt + " ", " Rome"), (prompt + "  ", "Rome")]:
        prompt_ids, target_ids = tokenize_continuation(tokenizer, p, t)
        assert (prompt_ids, target_ids) == expected
        assert decode(tokenizer, prompt_ids + target_ids) == prompt + " Rome"


def test_target_after_a_newline_has_no_space(tokenizer):
    prompt = "Q: Where is the Eiffel Tower?\n"
    prompt_ids, target_ids = tokenize_continuation(tokenizer, prompt, "Rome")
    assert decode(tokenizer, prompt_ids + target_ids) == prompt + "Rome"
    assert decode(tokenizer, target_ids) == "Rome"


class MergingTokenizer:
    """Word-level stub that merges "of Rome" into one token, so the prompt ids are no prefix."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=True):
        words = text.replace("of Rome", "of_Rome").split()
        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab)) for w in words]}


def test_tokenize_continuation_falls_back_when_the_tokenizer_merges_across_the_boundary():
    tok = MergingTokenizer()
    prompt_ids, target_ids = tokenize_continuation(tok, "the city of", "Rome")
    assert prompt_ids == tok("the city of")["input_ids"]
    assert target_ids == tok("Rome")["input_ids"]


def assert_holds_subject_end(tokenizer, template, subject, index):
    """The token at ``index`` holds the subject's last character: the text up to it covers the
    subject, the text before it does not."""
    text_to_subject_end = template.partition("{}")[0] + subject
    prompt_ids = tokenizer(fill(template, subject))["input_ids"]
    assert 0 <= index < len(prompt_ids)
    assert decode(tokenizer, prompt_ids[: index + 1]).startswith(text_to_subject_end)
    assert len(decode(tokenizer, prompt_ids[:index])) < len(text_to_subject_end)


@pytest.mark.parametrize("template, subject, target", CASES)
def test_subject_last_token_index(tokenizer, template, subject, target):
    index = subject_last_token_index(tokenizer, template, subject)
    assert_holds_subject_end(tokenizer, template, subject, index)
    # Where the tokenizer splits right after the subject, the token is the subject's own last piece.
    encoding = tokenizer(fill(template, subject), return_offsets_mapping=True)
    subject_end = len(template.partition("{}")[0] + subject)
    if not any(stop == subject_end for _, stop in encoding["offset_mapping"]):
        return  # the subject's end is merged with the next characters (only with a tiny vocabulary)
    prompt_ids = encoding["input_ids"]
    last_piece = decode(tokenizer, [prompt_ids[index]]).strip()
    assert last_piece and subject.endswith(last_piece), (last_piece, subject)
    before = template.partition("{}")[0]
    assert decode(tokenizer, prompt_ids[: index + 1]).strip() == (before + subject).strip()


def test_subject_last_token_index_when_the_subject_ends_inside_a_token(tokenizer):
    # "Pari" + "s" is the single token " Paris": the index is that token, not the one after it.
    template, subject = "The capital of France is {}s and it lies on the Seine", "Pari"
    index = subject_last_token_index(tokenizer, template, subject)
    assert_holds_subject_end(tokenizer, template, subject, index)
    prompt_ids = tokenizer(fill(template, subject))["input_ids"]
    assert decode(tokenizer, [prompt_ids[index]]).strip() == "Paris"


def test_subject_last_token_index_without_offsets():
    """Slow tokenizers have no character offsets: the index is the last token of the text up to the subject."""
    fast = tiny_tokenizer("bpe")

    def slow(text, return_offsets_mapping=False, **kwargs):
        if return_offsets_mapping:
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        return fast(text, **kwargs)

    for template, subject, _ in CASES:
        assert subject_last_token_index(slow, template, subject) == subject_last_token_index(
            fast, template, subject
        )


def test_subject_last_token_index_counts_the_bos_token():
    bpe, sp = tiny_tokenizer("bpe"), tiny_tokenizer("sentencepiece")
    template, subject = "{} is located in", "The Eiffel Tower"
    # The SentencePiece-style tokenizer puts BOS first, so the index is one further along.
    sp_ids, bpe_ids = sp(subject)["input_ids"], bpe(subject)["input_ids"]
    assert sp_ids[0] == sp.bos_token_id and bpe_ids[0] != bpe.bos_token_id
    assert subject_last_token_index(sp, template, subject) == len(sp_ids) - 1
    assert subject_last_token_index(bpe, template, subject) == len(bpe_ids) - 1


def test_check_requests_tokenize_accepts_valid_requests(tokenizer):
    requests = [EditRequest(prompt=t, subject=s, target_new=g) for t, s, g in CASES]
    check_requests_tokenize(tokenizer, requests)
