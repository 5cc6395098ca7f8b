"""MEMIT and AlphaEdit on SmolLM2-135M-Instruct with real CounterFact facts.

MEMIT writes 20 facts in one batch; AlphaEdit writes 4 batches of 5 one after another and must
keep the first batch. Scores come from the evaluation harness: probability comparison
(P(new) > P(true)) and greedy generation of the neighbourhood prompts against the unedited model.
Key statistics: WikiText, 20k tokens (computed once, then cached).
"""

from __future__ import annotations

import pytest
from tiny_models import shared_data_dir

from peft_edit import AlphaEditConfig, MemitConfig
from peft_edit.data import load_cases
from peft_edit.evaluation import evaluate

pytestmark = pytest.mark.real_model

DATA = shared_data_dir()
WIKITEXT = DATA / "wikitext_wiki.valid.raw"
COUNTERFACT = DATA / "counterfact_rome_sample500.json"


@pytest.fixture(scope="module")
def cases():
    if not (WIKITEXT.is_file() and COUNTERFACT.is_file()):
        pytest.skip("the shared benchmark data is not available")
    return load_cases(f"counterfact:{COUNTERFACT}", limit=20)


def test_memit_writes_a_batch_of_twenty_facts(smollm2, cases):
    model, tokenizer = smollm2
    result = evaluate(
        model,
        tokenizer,
        cases,
        MemitConfig(stats_corpus=str(WIKITEXT)),
        "batch",
        generation_tokens=0,
        progress=False,
    )
    s, unedited = result.summary, result.baseline
    assert unedited["efficacy_prob"] <= 0.5  # the new targets are not what the model believed
    assert s["efficacy_prob"] >= 0.8
    assert s["paraphrase_prob"] >= 0.7
    # Neighbours (same relation, other subjects) keep their greedy answers, and their true
    # answers stay preferred about as often as before the edits.
    assert s["locality_gen"] >= 0.9
    assert s["neighborhood_prob"] >= unedited["neighborhood_prob"] - 0.1


def test_alphaedit_keeps_the_first_of_four_sequential_batches(smollm2, cases):
    model, tokenizer = smollm2
    config = AlphaEditConfig(stats_corpus=str(WIKITEXT))
    result = evaluate(
        model, tokenizer, cases, config, "sequential", edit_batch_size=5, eval_every=5,
        generation_tokens=0, progress=False,
    )  # fmt: skip
    assert [p["edits"] for p in result.curve] == [5, 10, 15, 20]
    first_batch = result.records[:5]
    kept = sum(r["efficacy_prob"] for r in first_batch)
    assert kept >= 4, [r["efficacy_prob"] for r in first_batch]
    assert result.summary["efficacy_prob"] >= 0.8
    assert result.summary["locality_gen"] >= 0.9
