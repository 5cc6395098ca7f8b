"""GRACE on a real model, SmolLM2-135M-Instruct: 25 CounterFact corrections made one after another.

The edits must hold (greedy generation starts with each new target), 20 prompts about other
subjects must keep their answers, a saved adapter must give the same answers after a fresh
load, and unloading must give back the original weights bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from smollm2_helpers import REAL_MODEL
from tiny_models import shared_data_dir

from peft_edit import EditRequest, GraceConfig, get_edited_model
from peft_edit.data import load_counterfact
from peft_edit.evaluation.metrics import greedy_continuations, starts_with_answer
from peft_edit.tuners.grace.layer import GraceLayer

pytestmark = REAL_MODEL
DATA = shared_data_dir() / "counterfact_rome_sample500.json"
N_EDITS, N_UNRELATED = 25, 20


@pytest.fixture(scope="module")
def sequential(smollm2):
    if not DATA.is_file():
        pytest.skip(f"needs {DATA}")
    model, tokenizer = smollm2
    cases = load_counterfact(DATA)
    requests = [c.request for c in cases[:N_EDITS]]
    # Other subjects, many with the same relations as the edits (the hard case for locality).
    unrelated = [c.request.filled_prompt for c in cases[200 : 200 + N_UNRELATED]]
    unrelated_before = greedy_continuations(model, tokenizer, unrelated, 5)
    edited = get_edited_model(
        model, GraceConfig(), requests=requests[:1], tokenizer=tokenizer, progress=False
    )
    try:
        for request in requests[1:]:  # one correction at a time, as in lifelong editing
            edited.edit([request], progress=False)
        yield edited, tokenizer, requests, unrelated, unrelated_before
    finally:
        edited.unload_edits()


def test_sequential_edits_hold(sequential):
    edited, tokenizer, requests, _, _ = sequential
    outputs = greedy_continuations(edited, tokenizer, [r.filled_prompt for r in requests], 4)
    failed = [(r.target_new, o) for r, o in zip(requests, outputs) if not starts_with_answer(o, r.target_new)]
    assert len(failed) <= 1, failed
    assert edited.base_model.codebook()["keys"].shape[0] <= N_EDITS


def test_unrelated_prompts_keep_their_answers(sequential):
    edited, tokenizer, _, unrelated, before = sequential
    after = greedy_continuations(edited, tokenizer, unrelated, 5)
    changed = [(p, b, a) for p, b, a in zip(unrelated, before, after) if a != b]
    assert not changed, changed


def test_save_and_fresh_load_give_the_same_answers(sequential, tmp_path):
    from peft_edit.demo import load_smollm2

    edited, tokenizer, requests, unrelated, _ = sequential
    prompts = [r.filled_prompt for r in requests] + unrelated
    edited.save_pretrained(tmp_path / "grace")
    fresh, _ = load_smollm2()
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "grace")
    codebook = reloaded.base_model.codebook()
    assert all(torch.equal(codebook[k], v) for k, v in edited.base_model.codebook().items())
    assert greedy_continuations(reloaded, tokenizer, prompts, 4) == greedy_continuations(
        edited, tokenizer, prompts, 4
    )


def test_unload_gives_back_the_original_weights(smollm2, sequential):
    model, _ = smollm2
    edited = sequential[0]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "grace_" not in n}
    base = edited.unload_edits()
    after = dict(base.named_parameters())
    assert set(after) == {n.replace(".base_layer", "") for n in before}
    assert all(torch.equal(after[n.replace(".base_layer", "")], p) for n, p in before.items())


def test_a_split_after_an_expand_leaves_every_prompt_its_own_answer(smollm2, monkeypatch):
    """A rephrase with the same target widens the first entry's ball; a third wording with another
    target then splits it, halving that ball short of the rephrase. Each prompt keeps its answer:
    the rephrase's own key was stored when the ball was widened for it."""
    model, tokenizer = smollm2
    prompts = [
        "What is the capital city of France?",
        "Which city is the capital of France?",
        "What is the capital of France?",
    ]
    targets = ["Lyon", "Lyon", "Marseille"]
    requests = [EditRequest(prompt=p, subject="France", target_new=t) for p, t in zip(prompts, targets)]
    actions = []
    placement = GraceLayer.placement

    def recorded(self, *args, **kwargs):
        found = placement(self, *args, **kwargs)
        actions.append(found.action)
        return found

    monkeypatch.setattr(GraceLayer, "placement", recorded)
    edited = get_edited_model(model, GraceConfig(), requests=requests[:1], tokenizer=tokenizer, progress=False)
    try:
        for request in requests[1:]:
            edited.edit([request], progress=False)
        assert actions == ["add", "expand", "split"]
        outputs = greedy_continuations(edited, tokenizer, prompts, 3)
        assert all(starts_with_answer(o, t) for o, t in zip(outputs, targets)), outputs
    finally:
        edited.unload_edits()


# A hallucination-style correction: a sentence-long target after a passage.
LONG_CORRECTION = EditRequest(
    prompt="Marie Curie was a physicist and chemist who conducted pioneering research on radioactivity. She",
    subject="Marie Curie",
    target_new="was born in Lisbon in 1871, trained as a violinist in Vienna under Joseph Hellmesberger, and "
    "only turned to chemistry at forty, after a fire destroyed the concert hall where she played every winter.",
)


def test_the_mean_stop_rule_lands_a_long_correction_in_fewer_steps(smollm2, grace_value_steps):
    """A sentence-long target: under the default rule the optimisation goes on until its least likely
    token passes probability 0.5, though every token is already the greedy choice; the mean rule stops
    there, and greedy generation still writes the whole sentence."""
    model, tokenizer = smollm2
    request = LONG_CORRECTION
    for config in (GraceConfig(), GraceConfig(stop_rule="mean")):
        edited = get_edited_model(model, config, requests=[request], tokenizer=tokenizer, progress=False)
        try:
            (output,) = greedy_continuations(edited, tokenizer, [request.filled_prompt], 50)
            assert output.strip().startswith(request.target_new), output
        finally:
            edited.unload_edits()
    every_token, mean = grace_value_steps
    assert mean < 0.8 * every_token < 0.8 * config.value_steps


def test_a_value_optimised_in_bfloat16_writes_the_correction_at_full_precision(smollm2):
    """With compute_dtype='bfloat16' the steps run the upper blocks in bfloat16; the stop rule is confirmed
    in float32, so the float32 model writes the whole sentence, and its weights are float32 and untouched."""
    model, tokenizer = smollm2
    upper = {n: p.detach().clone() for n, p in model.named_parameters() if ".layers.2" in n}
    config = GraceConfig(compute_dtype="bfloat16")
    edited = get_edited_model(model, config, requests=[LONG_CORRECTION], tokenizer=tokenizer, progress=False)
    try:
        for name, p in model.named_parameters():
            if name in upper:
                assert p.dtype == torch.float32 and torch.equal(p, upper[name]), name
        (output,) = greedy_continuations(edited, tokenizer, [LONG_CORRECTION.filled_prompt], 50)
        assert output.strip().startswith(LONG_CORRECTION.target_new), output
    finally:
        edited.unload_edits()
