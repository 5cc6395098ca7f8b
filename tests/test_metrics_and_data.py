"""The CounterFact loader on the real files, and the batched probes against unbatched references."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import shared_data_dir, tiny_model_and_tokenizer

from peft_edit.data import load_counterfact
from peft_edit.data.counterfact import MalformedRecordError
from peft_edit.evaluation.metrics import (
    TeacherForced,
    greedy_continuations,
    starts_with_answer,
    teacher_forced,
)
from peft_edit.requests import tokenize_continuation

DATA = shared_data_dir()
needs_data = pytest.mark.skipif(
    not (DATA / "counterfact_rome_sample500.json").exists(), reason="no shared data"
)


@needs_data
def test_counterfact_rome_schema():
    cases = load_counterfact(DATA / "counterfact_rome_sample500.json")
    assert len(cases) == 500
    first = cases[0]
    assert first.case_id == "20952"
    assert "{}" in first.request.prompt and first.request.target_true
    assert len(first.rephrases) == 2 and len(first.neighbors) == 10
    assert all(n.answer == first.request.target_true for n in first.neighbors)


@needs_data
def test_counterfact_easyedit_schema_with_limit():
    cases = load_counterfact(DATA / "counterfact_easyedit_edit_first2000.json", limit=50)
    assert len(cases) == 50
    assert cases[0].request.subject in cases[0].request.prompt
    assert len(cases[0].rephrases) == 1 and len(cases[0].neighbors) == 1


def test_a_malformed_record_names_file_record_and_field(tmp_path: Path):
    good = {"prompt": "A is in", "subject": "A", "target_new": "X", "ground_truth": "Y", "rephrase_prompt": "Where is A?",
            "locality_prompt": "B is in", "locality_ground_truth": "Z"}  # fmt: skip
    bad = dict(good)
    del bad["rephrase_prompt"]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([good, bad]))
    with pytest.raises(MalformedRecordError, match=r"cf.json record 1: missing field 'rephrase_prompt'"):
        load_counterfact(path)
    path.write_text(json.dumps([{**good, "subject": "Q"}]))
    with pytest.raises(MalformedRecordError, match="record 0.*does not occur"):
        load_counterfact(path)


PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "Rome is",
    "The city of Berlin is located in Germany and",
]
ANSWERS = ["Paris", "the capital city of Italy", "Spain"]


def test_teacher_forced_batch_equals_one_at_a_time():
    model, tokenizer = tiny_model_and_tokenizer("llama")
    batched = teacher_forced(model, tokenizer, PROMPTS, ANSWERS, batch_size=3)
    for prompt, answer, got in zip(PROMPTS, ANSWERS, batched):
        p, a = tokenize_continuation(tokenizer, prompt, answer)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + a])).logits[0].float(), -1)
        expected = [logp[len(p) - 1 + j, t].item() for j, t in enumerate(a)]
        assert got.answer_ids == a
        assert got.logprobs == pytest.approx(expected, abs=1e-4)
        assert got.argmax_ids == [logp[len(p) - 1 + j].argmax().item() for j in range(len(a))]


def test_pairs_with_the_same_model_row_share_it_and_score_as_alone():
    # Two one-token answers after one prompt need the same row (the prompt), and so do a prompt
    # that ends where another pair's answer begins and that pair: five pairs, three model rows.
    model, tokenizer = tiny_model_and_tokenizer("llama")
    prompts = ["Rome is", "Rome is", "Rome is", "Rome is the", "Big Ben is in"]
    answers = ["Paris", "London", "the capital", "capital", "London"]
    encoded = [tokenize_continuation(tokenizer, p, a) for p, a in zip(prompts, answers)]
    # What the sharing below relies on: one-token answers, and the same ids split in two ways.
    assert len(encoded[0][1]) == len(encoded[1][1]) == 1
    assert encoded[2][0] + encoded[2][1] == encoded[3][0] + encoded[3][1] and encoded[2][0] != encoded[3][0]
    rows_run = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: rows_run.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        batched = teacher_forced(model, tokenizer, prompts, answers, batch_size=8)
    finally:
        hook.remove()
    assert sum(rows_run) == 3  # "Rome is"; "Rome is the" and what the answer adds; "Big Ben is in"
    for (p, a), got in zip(encoded, batched):
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + a])).logits[0].float(), -1)
        assert got.answer_ids == a
        assert got.logprobs == pytest.approx([logp[len(p) - 1 + j, t].item() for j, t in enumerate(a)], abs=1e-4)
        assert got.argmax_ids == [logp[len(p) - 1 + j].argmax().item() for j in range(len(a))]


def test_token_accuracy_and_mean_logprob_on_known_numbers():
    scored = TeacherForced(answer_ids=[5, 6, 7, 8], logprobs=[-0.5, -1.5, -2.0, 0.0], argmax_ids=[5, 1, 7, 2])
    assert scored.token_accuracy == 0.5
    assert scored.mean_logprob == -1.0


def test_greedy_batch_equals_one_at_a_time():
    model, tokenizer = tiny_model_and_tokenizer("llama")
    batched = greedy_continuations(model, tokenizer, PROMPTS, [2, 4, 3], batch_size=3)
    for prompt, n, got in zip(PROMPTS, [2, 4, 3], batched):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        out = model.generate(
            input_ids=ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        assert got == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_starts_with_answer():
    assert starts_with_answer(" Rome, Italy", "Rome")
    assert not starts_with_answer(" Paris", "Rome")
