"""The evaluation harness: metric functions on hand-made numbers, protocols on a tiny model, one real run.

Metric tests build logits / outputs whose right answers are known by construction. Protocol tests
run ROME on a tiny random Llama (mechanics: restores, curve points, counts), and one test runs
the single protocol on SmolLM2 to check that the numbers mean what they say.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import assert_state_unchanged, shared_data_dir, state, tiny_model_and_tokenizer

from peft_edit import EditRequest, get_edited_model
from peft_edit.data import EditCase, PiqaExample, Probe
from peft_edit.evaluation import (
    METRICS,
    EvaluationResult,
    RestoreError,
    evaluate,
    pre_edit_reference,
)
from peft_edit.evaluation.fluency import mentions, ngram_entropy
from peft_edit.evaluation.metrics import (
    TeacherForced,
    answer_scores,
    greedy_continuations,
    prefers,
    teacher_forced,
    unchanged_fraction,
)
from peft_edit.evaluation.piqa import piqa_accuracy, sample_questions
from peft_edit.evaluation.report import format_table, plot_results, read_json, results_json, write_json
from peft_edit.evaluation.restore import WeightSnapshot
from peft_edit.evaluation.scoring import (
    CaseOutputs,
    ScoreSettings,
    case_metrics,
    greedy_from_forced,
    run_probes,
    summarize,
)
from peft_edit.registration import edit_method_config

DATA = shared_data_dir()

# ------------------------------------------------------------------ teacher forcing on hand-made logits

VOCAB = 5
PAD_LOGIT = 50.0  # huge logits at padded positions: any read of them would change the answers


def _logits_row(width: int, probs_at: dict[int, list[float]]) -> torch.Tensor:
    row = torch.full((width, VOCAB), PAD_LOGIT)
    for position, probs in probs_at.items():
        row[position] = torch.tensor(probs).log()
    return row


@pytest.mark.parametrize("padding", ["right", "left"])
def test_answer_scores_reads_exactly_the_answer_positions(padding):
    # Row 0: prompt of 3 tokens, answer [2, 4] (two tokens). Row 1: prompt of 2 tokens, answer [1].
    # Width 5: row 0 fills it; row 1 has 2 pads, on the right or on the left.
    p0 = {2: [0.1, 0.1, 0.5, 0.2, 0.1], 3: [0.1, 0.1, 0.2, 0.2, 0.4]}  # predicts answer tokens 2 then 4
    start1 = 0 if padding == "right" else 2
    p1 = {start1 + 1: [0.2, 0.3, 0.4, 0.05, 0.05]}  # argmax 2, answer token 1
    logits = torch.stack([_logits_row(5, p0), _logits_row(5, p1)])
    scored = answer_scores(logits, starts=[0, start1], prompt_lengths=[3, 2], answers=[[2, 4], [1]])

    assert scored[0].answer_ids == [2, 4]
    assert scored[0].logprobs == pytest.approx([math.log(0.5), math.log(0.4)], abs=1e-6)
    assert scored[0].argmax_ids == [2, 4] and scored[0].token_accuracy == 1.0
    assert scored[0].mean_logprob == pytest.approx((math.log(0.5) + math.log(0.4)) / 2, abs=1e-6)
    assert scored[1].logprobs == pytest.approx([math.log(0.3)], abs=1e-6)
    assert scored[1].argmax_ids == [2] and scored[1].token_accuracy == 0.0
    assert scored[1].total_logprob == pytest.approx(math.log(0.3), abs=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "opt", "qwen2", "gemma2", "phi"])
def test_left_and_right_padding_give_the_same_scores(family):
    # Left padding passes position ids and asks only for the answer positions' logits.
    model, tokenizer = tiny_model_and_tokenizer(family)
    prompts = ["The Eiffel Tower is located in the city of", "Rome is", "Big Ben is in"]
    answers = ["Paris", "the capital city of Italy", "London"]
    right = teacher_forced(model, tokenizer, prompts, answers, batch_size=3, padding_side="right")
    left = teacher_forced(model, tokenizer, prompts, answers, batch_size=3, padding_side="left")
    for r, lt in zip(right, left):
        assert r.argmax_ids == lt.argmax_ids
        assert r.logprobs == pytest.approx(lt.logprobs, abs=1e-4)
    with pytest.raises(ValueError, match="padding_side"):
        teacher_forced(model, tokenizer, prompts, answers, padding_side="middle")


def test_greedy_batches_mixed_lengths_like_one_at_a_time():
    model, tokenizer = tiny_model_and_tokenizer("llama")
    prompts = ["Rome is", "The Colosseum is located in the city of", "Paris", "Big Ben is"]
    lengths = [1, 5, 3, 5]
    batched = greedy_continuations(model, tokenizer, prompts, lengths, batch_size=2)
    for prompt, n, got in zip(prompts, lengths, batched):
        assert got == greedy_continuations(model, tokenizer, [prompt], n)[0]


def test_greedy_continues_a_prompt_ending_in_spaces_as_teacher_forcing_reads_it():
    model, tokenizer = tiny_model_and_tokenizer("llama")
    prompt = "The Colosseum is located in the city of  "
    (text,) = greedy_continuations(model, tokenizer, [prompt], 4)
    assert text == greedy_continuations(model, tokenizer, [prompt.rstrip()], 4)[0]
    # Teacher forcing moves the prompt's spaces into the answer: fed the greedy text as the answer,
    # it finds the model's own top token at every position.
    (forced,) = teacher_forced(model, tokenizer, [prompt], [text])
    assert forced.argmax_ids == forced.answer_ids


def test_generation_batches_group_similar_token_needs():
    from peft_edit.evaluation.metrics import GENERATION_SLACK_TOKENS, _generation_batches

    needs = [2, 40, 4, 100, 30, 2, 2]
    batches = _generation_batches(needs, prompt_lengths=[5] * len(needs), batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(len(needs)))
    assert batches == [[0, 5, 6], [2], [4, 1], [3]]  # short first; the batch of three is full
    for b in batches:
        shortest = min(needs[i] for i in b)
        assert max(needs[i] for i in b) - shortest <= max(GENERATION_SLACK_TOKENS, shortest // 2)


def test_batches_keep_logits_under_the_budget():
    from peft_edit.evaluation.metrics import LOGIT_POSITIONS_PER_BATCH, _length_batches

    lengths = [10, 300, 40, 40, 5000, 12, 90]
    positions = [2, 150, 3, 700, 5000, 1, 80]  # one row alone exceeds the budget
    batches = _length_batches(lengths, positions, batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [4]  # the longest first, alone
    for b in batches:
        assert 1 <= len(b) <= 3
        assert len(b) == 1 or len(b) * max(positions[i] for i in b) <= LOGIT_POSITIONS_PER_BATCH


def test_probability_comparison_and_unchanged_tokens():
    likely = TeacherForced([1, 2], [-0.1, -0.3], [1, 2])
    unlikely_short = TeacherForced([3], [-0.5], [1])
    assert prefers(likely, unlikely_short) and not prefers(unlikely_short, likely)
    # The mean, not the sum: a long answer is not penalised for its length.
    long_answer = TeacherForced([1, 2, 3, 4], [-0.2] * 4, [1, 2, 3, 4])
    assert prefers(long_answer, unlikely_short)
    assert unchanged_fraction([1, 2, 3, 4], [1, 9, 3, 9]) == 0.5
    with pytest.raises(ValueError, match="same probe"):
        unchanged_fraction([1, 2], [1])


# ------------------------------------------------------------------------------ fluency and consistency


def test_ngram_entropy_on_known_texts():
    # "a b a b": bigrams ab, ba, ab (2/3, 1/3); trigrams aba, bab (1/2 each).
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    # Eight distinct words: 7 distinct bigrams and 6 distinct trigrams, uniform.
    assert ngram_entropy("one two three four five six seven eight") == pytest.approx(
        (2 / 3 * math.log2(7) + 4 / 3 * math.log2(6)) / 2
    )
    assert ngram_entropy("Rome Rome Rome Rome Rome Rome") == 0.0
    assert ngram_entropy("") == 0.0


def test_mentions_whole_words_any_case():
    assert mentions("People there speak Italian, as in rome.", "Rome")
    assert not mentions("Romeo and Juliet", "Rome")
    assert mentions("It is in New York City", "New York")
    assert not mentions("anything", "  ")


# ----------------------------------------------------------------------------------- per-case metrics


def _tf(answer, argmax, logprob):
    return TeacherForced(list(answer), [logprob] * len(answer), list(argmax))


def _two_request_case(target_true="Paris"):
    first = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", target_true)
    second = EditRequest("{} is located in the city of", "Big Ben", "Berlin", "London")
    return EditCase(
        "c1",
        first,
        rephrases=["Where is the Eiffel Tower?"],
        neighbors=[Probe("The Louvre is in", "Paris"), Probe("The Prado is in", "Madrid")],
        portability=[Probe("The Eiffel Tower's country is", "Italy")],
        generation_prompts=["The Eiffel Tower is", "The Eiffel Tower is"],
        extra_requests=[second],
    )


def test_case_metrics_on_hand_made_outputs():
    case = _two_request_case()
    out = CaseOutputs(
        forced={
            ("edit", 0, "new"): _tf([7, 8], [7, 8], -0.1),  # both tokens right
            ("edit", 0, "true"): _tf([9], [9], -2.0),
            ("edit", 1, "new"): _tf([5, 6], [5, 0], -3.0),  # half right, and less likely than the true answer
            ("edit", 1, "true"): _tf([4], [4], -1.0),
            ("rephrase", 0, "new"): _tf([7, 8], [0, 8], -1.0),
            ("rephrase", 0, "true"): _tf([9], [9], -0.5),
            ("neighbor", 0, "keep"): _tf([9], [9], -0.2),
            ("neighbor", 0, "new"): _tf([7, 8], [7, 8], -0.1),  # the neighbour now prefers the new target
            ("neighbor", 1, "keep"): _tf([3, 4], [3, 1], -0.3),
            ("neighbor", 1, "new"): _tf([7, 8], [7, 8], -5.0),
            ("portability", 0, "new"): _tf([2], [2], -0.1),
        },
        generated={
            ("edit", 0): " Rome, Italy",
            ("edit", 1): " London",
            ("rephrase", 0): " It is in Paris",
            ("neighbor", 0): " Paris",
            ("neighbor", 1): " Madrid and",
            ("portability", 0): " Italy",
            ("generation", 0): " in Rome, the capital of Italy.",
        },
    )
    before = CaseOutputs(
        forced={
            ("neighbor", 0, "keep"): _tf([9], [9], -0.2),
            ("neighbor", 1, "keep"): _tf([3, 4], [3, 4], -0.3),
        },
        generated={("neighbor", 0): " Paris", ("neighbor", 1): " Madrid, Spain"},
    )
    m = case_metrics(case, out, before)
    assert set(m) == set(METRICS)
    assert m["reliability_tf"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["generalization_tf"] == 0.5
    assert m["locality_tf"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["portability_tf"] == 1.0
    assert m["efficacy_prob"] == 0.5
    assert m["paraphrase_prob"] == 0.0
    assert m["neighborhood_prob"] == 0.5
    assert m["reliability_gen"] == 0.5
    assert m["generalization_gen"] == 0.0
    assert m["locality_gen"] == 0.5
    assert m["portability_gen"] == 1.0
    assert m["consistency"] == 1.0
    assert m["fluency"] == pytest.approx(ngram_entropy(" in Rome, the capital of Italy."))
    # Compared with itself (the unedited model's own scores), locality is 1 by definition.
    assert case_metrics(case, out, out)["locality_tf"] == 1.0


def test_metrics_the_data_cannot_give_are_none():
    request = EditRequest("{} is in", "Big Ben", "Berlin")  # no target_true
    case = EditCase("bare", request)
    out = CaseOutputs(forced={("edit", 0, "new"): _tf([5], [5], -0.1)}, generated={("edit", 0): " Berlin"})
    m = case_metrics(case, out, out)
    assert m["reliability_tf"] == 1.0 and m["reliability_gen"] == 1.0
    missing = {k for k, v in m.items() if v is None}
    assert missing == set(METRICS) - {"reliability_tf", "reliability_gen"}
    summary = summarize([m, {**m, "reliability_tf": 0.0}])
    assert summary["reliability_tf"] == 0.5 and summary["efficacy_prob"] is None


# ----------------------------------------------------------------------------- protocols on a tiny model

SUBJECTS = [
    ("The Eiffel Tower", "Rome", "Paris"),
    ("The Colosseum", "Paris", "Rome"),
    ("Big Ben", "Berlin", "London"),
    ("The Space Needle", "Madrid", "Seattle"),
    ("The Louvre", "London", "Paris"),
]
FAST_ROME = {"v_num_steps": 3, "context_template_lengths": [3], "context_templates_per_length": 1}


def _cases(n: int = 5):
    return [
        EditCase(
            str(i),
            EditRequest("{} is located in the city of", s, new, true),
            rephrases=[f"Where is {s}? It is in the city of"],
            neighbors=[Probe("The Pantheon is located in", "Rome")],
            generation_prompts=[f"{s} is"],
        )
        for i, (s, new, true) in enumerate(SUBJECTS[:n])
    ]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_and_tokenizer("llama")


SETTINGS = {"generation_tokens": 4, "progress": False, "config_overrides": FAST_ROME}


def test_single_protocol_restores_and_reports(tiny):
    model, tokenizer = tiny
    before = state(model)
    result = evaluate(model, tokenizer, _cases(3), "rome", "single", **SETTINGS)
    assert_state_unchanged(model, before)
    assert [r["case_id"] for r in result.records] == ["0", "1", "2"]
    assert result.summary["cases"] == 3 and result.summary["edits"] == 3
    assert result.summary["seconds_per_edit"] > 0 and result.summary["peak_rss_mb"] > 0
    for key in METRICS:
        assert key in result.summary and key in result.baseline
    assert result.summary["portability_tf"] is None  # these cases have no portability questions
    assert 0 <= result.summary["efficacy_prob"] <= 1 and result.summary["fluency"] >= 0
    assert result.baseline["locality_tf"] == 1.0
    assert result.config["v_num_steps"] == 3 and result.method == "rome"


def test_batch_protocol_makes_one_edit_call(tiny, tmp_path):
    model, tokenizer = tiny
    before = state(model)
    cases = _cases(2)
    cases[1].extra_requests.append(EditRequest("{} is in", "Madrid", "Oslo", "Spain"))
    result = evaluate(model, tokenizer, cases, "rome", "batch", **SETTINGS)
    assert_state_unchanged(model, before)
    assert result.summary["edits"] == 3
    assert result.summary["first_edit_seconds"] == result.summary["edit_seconds"]  # one call
    assert len(result.records) == 2 and result.curve == []
    # The adapter's size is what save_pretrained writes for the same edits.
    edited = get_edited_model(
        model, edit_method_config("rome", **FAST_ROME), requests=[r for c in cases for r in c.requests],
        tokenizer=tokenizer, progress=False,
    )  # fmt: skip
    try:
        edited.save_pretrained(tmp_path)
    finally:
        edited.unload_edits()
    saved = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert result.summary["adapter_kb"] == pytest.approx(saved / 1024, abs=0.1)


def test_sequential_protocol_curve_points(tiny):
    model, tokenizer = tiny
    before = state(model)
    cases = _cases(5)
    reference = pre_edit_reference(
        model, tokenizer, cases, ScoreSettings(generation_tokens=4), progress=False
    )
    seen = []
    result = evaluate(
        model, tokenizer, cases, "rome", "sequential", eval_every=2, reference=reference,
        on_curve_point=seen.append, **SETTINGS,
    )  # fmt: skip
    assert_state_unchanged(model, before)
    assert [p["cases"] for p in result.curve] == [2, 4, 5]
    assert seen == result.curve  # each point handed over as it was scored
    assert [p["edits"] for p in result.curve] == [2, 4, 5]
    assert [r["case_id"] for r in result.records] == [c.case_id for c in cases]
    last = result.curve[-1]
    assert all(last[k] == result.summary[k] for k in METRICS)
    assert result.baseline == reference.summary
    assert result.summary["adapter_kb"] > 0


def test_sequential_batches_of_edits(tiny):
    model, tokenizer = tiny
    before = state(model)
    cases = _cases(5)
    reference = pre_edit_reference(
        model, tokenizer, cases, ScoreSettings(generation_tokens=0), progress=False
    )
    result = evaluate(
        model, tokenizer, cases[:4], "rome", "sequential", edit_batch_size=2, eval_every=3,
        reference=reference.subset(4), **{**SETTINGS, "generation_tokens": 0},
    )  # fmt: skip
    assert_state_unchanged(model, before)
    # Calls end after 2 and 4 cases; 3 is first reached by the second call, which is also the last.
    assert [p["cases"] for p in result.curve] == [4]
    assert (
        result.summary["edits"] == 4 and result.summary["first_edit_seconds"] < result.summary["edit_seconds"]
    )
    assert reference.subset(2).case_ids == ["0", "1"]
    assert reference.subset(2).summary["efficacy_prob"] == summarize(reference.records[:2])["efficacy_prob"]
    with pytest.raises(ValueError, match="sequential protocol"):
        evaluate(
            model, tokenizer, cases, "rome", "single", edit_batch_size=2, reference=reference, **SETTINGS
        )
    with pytest.raises(ValueError, match="on_curve_point applies to the sequential protocol"):
        evaluate(
            model, tokenizer, cases, "rome", "batch", on_curve_point=print, reference=reference, **SETTINGS
        )


class _Interrupted(Exception):
    pass


def test_a_sequential_run_goes_on_from_its_checkpoint(tiny, tmp_path):
    """Stopped after its first curve point, a run resumed from the checkpoint loads those edits instead of
    making them again, and ends with the scores of a run never stopped."""
    model, tokenizer = tiny
    before = state(model)
    cases = _cases(5)
    reference = pre_edit_reference(
        model, tokenizer, cases, ScoreSettings(generation_tokens=4), progress=False
    )
    run = {"eval_every": 2, "reference": reference, **SETTINGS}
    whole = evaluate(model, tokenizer, cases, "rome", "sequential", **run)

    def stop_after_two_cases(point):
        if point["cases"] == 2:
            raise _Interrupted

    folder = tmp_path / "checkpoint"
    with pytest.raises(_Interrupted):
        evaluate(
            model, tokenizer, cases, "rome", "sequential", checkpoint=folder, on_curve_point=stop_after_two_cases,
            **run,
        )  # fmt: skip
    assert_state_unchanged(model, before)
    first_edits = json.loads((folder / "progress.json").read_text())["edit_seconds"]
    assert len(first_edits) == 2 and (folder / "adapter" / "adapter_config.json").is_file()

    seen = []
    resumed = evaluate(
        model, tokenizer, cases, "rome", "sequential", checkpoint=folder, resume=True, on_curve_point=seen.append,
        **run,
    )  # fmt: skip
    assert_state_unchanged(model, before)
    assert [p["cases"] for p in resumed.curve] == [2, 4, 5] and seen == resumed.curve
    assert [r["edit_seconds"] for r in resumed.records][:2] == first_edits  # loaded, not edited again
    assert resumed.summary["edits"] == 5
    for key in METRICS:
        assert resumed.summary[key] == pytest.approx(whole.summary[key], abs=1e-6), key
    assert [p["reliability_tf"] for p in resumed.curve] == pytest.approx(
        [p["reliability_tf"] for p in whole.curve]
    )


def test_a_checkpoint_of_other_cases_or_settings_is_refused(tiny, tmp_path):
    model, tokenizer = tiny
    before = state(model)
    cases = _cases(3)
    reference = pre_edit_reference(
        model, tokenizer, cases, ScoreSettings(generation_tokens=0), progress=False
    )
    run = {"reference": reference, **{**SETTINGS, "generation_tokens": 0}}
    folder = tmp_path / "checkpoint"
    evaluate(model, tokenizer, cases, "rome", "sequential", eval_every=2, checkpoint=folder, **run)
    with pytest.raises(ValueError, match="another case_ids"):
        evaluate(
            model, tokenizer, cases[:2], "rome", "sequential", eval_every=2, checkpoint=folder, resume=True,
            **{**run, "reference": reference.subset(2)},
        )  # fmt: skip
    with pytest.raises(ValueError, match="another eval_every"):
        evaluate(
            model, tokenizer, cases, "rome", "sequential", eval_every=1, checkpoint=folder, resume=True, **run
        )
    assert_state_unchanged(model, before)
    with pytest.raises(ValueError, match="checkpoint applies to the sequential protocol"):
        evaluate(model, tokenizer, cases, "rome", "single", checkpoint=folder, **run)
    with pytest.raises(ValueError, match="resume=True needs the checkpoint"):
        evaluate(model, tokenizer, cases, "rome", "sequential", resume=True, **run)


def test_a_reference_for_other_cases_is_refused(tiny):
    model, tokenizer = tiny
    reference = pre_edit_reference(
        model, tokenizer, _cases(2), ScoreSettings(generation_tokens=0), progress=False
    )
    with pytest.raises(ValueError, match="other cases"):
        evaluate(model, tokenizer, _cases(3), "rome", reference=reference, **SETTINGS)
    with pytest.raises(ValueError, match="Unknown protocol"):
        evaluate(model, tokenizer, _cases(1), "rome", "parallel", **SETTINGS)
    with pytest.raises(ValueError, match="Unknown edit method"):
        evaluate(model, tokenizer, _cases(1), "no-such-method", **SETTINGS)


def test_restore_check_catches_a_single_changed_bit(tiny):
    model, _ = tiny
    snapshot = WeightSnapshot(model)
    snapshot.verify(model)
    snapshot.verify(model, ["model.layers.1.mlp.down_proj"])
    weight = model.model.layers[1].mlp.down_proj.weight
    original = weight.data[0, 0].clone()
    try:
        weight.data[0, 0] = torch.nextafter(original, original + 1)
        with pytest.raises(RestoreError, match="down_proj"):
            snapshot.verify(model, ["model.layers.1.mlp.down_proj"])
        snapshot.verify(model, ["model.layers.2.mlp.down_proj"])  # only the named modules are checked
        with pytest.raises(RestoreError):
            snapshot.verify(model)
    finally:
        weight.data[0, 0] = original
    snapshot.verify(model)


def test_probes_of_many_cases_in_one_call_match_one_case_at_a_time(tiny):
    model, tokenizer = tiny
    cases = _cases(4)
    settings = ScoreSettings(generation_tokens=3, cases_per_chunk=3)
    together = run_probes(model, tokenizer, cases, settings)
    for case, joint in zip(cases, together):
        (alone,) = run_probes(model, tokenizer, [case], settings)
        assert alone.generated == joint.generated
        assert {k: v.argmax_ids for k, v in alone.forced.items()} == {
            k: v.argmax_ids for k, v in joint.forced.items()
        }
        for key, scored in alone.forced.items():
            assert scored.logprobs == pytest.approx(joint.forced[key].logprobs, abs=1e-4)


def test_greedy_answers_read_from_teacher_forcing_equal_decoding(tiny):
    model, tokenizer = tiny
    cases = _cases(4)
    outputs = run_probes(model, tokenizer, cases, ScoreSettings(generation_tokens=0))
    read_off = []
    for case, out in zip(cases, outputs):
        probes = [(("edit", 0), case.request.filled_prompt, ("edit", 0, "new"))]
        probes += [(("rephrase", j), p, ("rephrase", j, "new")) for j, p in enumerate(case.rephrases)]
        probes += [(("neighbor", j), n.prompt, ("neighbor", j, "keep")) for j, n in enumerate(case.neighbors)]
        for key, prompt, forced_key in probes:
            n = len(out.forced[forced_key].answer_ids)
            assert out.generated[key] == greedy_continuations(model, tokenizer, [prompt], n)[0]
            read_off.append(greedy_from_forced(out.forced, key, prompt) is not None)
    assert len(read_off) == 12 and any(read_off) and not all(read_off)  # both paths were taken


# ------------------------------------------------------------------------------------------- PIQA


def test_piqa_accuracy_picks_the_likelier_solution(tiny):
    model, tokenizer = tiny
    questions = [
        PiqaExample("Where is the Eiffel Tower?", "It is in Paris.", "Rome Rome Rome Rome.", 0),
        PiqaExample("Where is Big Ben?", "London London.", "It is in London.", 1),
        PiqaExample("Where is the Colosseum?", "In Rome.", "In the city of Rome.", 0),
    ]
    from peft_edit.evaluation.piqa import PROMPT

    expected = 0
    for q in questions:
        a, b = teacher_forced(model, tokenizer, [PROMPT.format(goal=q.goal)] * 2, [q.sol1, q.sol2])
        expected += (0 if a.total_logprob >= b.total_logprob else 1) == q.label
    assert piqa_accuracy(model, tokenizer, questions) == pytest.approx(expected / 3)
    assert piqa_accuracy(model, tokenizer, []) is None


def test_single_protocol_asks_piqa_after_every_kth_edit(tiny):
    model, tokenizer = tiny
    questions = [PiqaExample("Where is Big Ben?", "It is in London.", "London London.", 0)] * 2
    result = evaluate(model, tokenizer, _cases(3), "rome", "single", piqa=questions, piqa_every=2, **SETTINGS)
    asked = [r["piqa_acc"] for r in result.records]
    assert asked[1] is None and None not in (asked[0], asked[2])
    assert result.summary["piqa_acc"] == pytest.approx((asked[0] + asked[2]) / 2)
    assert result.baseline["piqa_acc"] == piqa_accuracy(model, tokenizer, questions)


def test_piqa_sample_is_seeded_and_in_file_order():
    questions = [PiqaExample(f"goal {i}", "a", "b", i % 2) for i in range(50)]
    first = sample_questions(questions, 10)
    assert first == sample_questions(questions, 10)
    assert [q.goal for q in first] == sorted((q.goal for q in first), key=lambda g: int(g.split()[1]))
    assert len(set(first)) == 10 and sample_questions(questions, None) == questions
    assert sample_questions(questions, 100) == questions


# ------------------------------------------------------------------------------------------ reports


def test_table_json_and_charts(tiny, tmp_path):
    pytest.importorskip("matplotlib")
    model, tokenizer = tiny
    cases = _cases(3)
    reference = pre_edit_reference(
        model, tokenizer, cases, ScoreSettings(generation_tokens=4), progress=False
    )
    single = evaluate(model, tokenizer, cases, "rome", "single", reference=reference, **SETTINGS)
    sequential = evaluate(
        model, tokenizer, cases, "rome", "sequential", eval_every=1, reference=reference, **SETTINGS
    )
    table = format_table([single, sequential])
    header, _, *rows = table.splitlines()
    assert header.split("|")[2:5] == [" unedited ", " rome (single) ", " rome (sequential) "]
    assert len(rows) >= len(METRICS) and all(r.count("|") == 5 for r in rows)
    portability = next(r for r in rows if r.startswith("| portability_tf "))
    assert portability.count("–") == 3  # no portability questions: shown as missing, not as 0
    assert set(results_json([single])) >= {"summary", "baseline", "records", "method", "protocol"}
    assert [r["protocol"] for r in results_json([single, sequential])["runs"]] == ["single", "sequential"]
    written = plot_results([single, sequential], tmp_path)
    assert [p.name for p in written] == ["metrics.png", "sequential.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)


# ------------------------------------------------------------------------------------------ SmolLM2


@pytest.mark.real_model
def test_rome_on_smollm2_moves_the_numbers_the_right_way(smollm2):
    model, tokenizer = smollm2
    if not (DATA / "counterfact_rome_sample500.json").exists():
        pytest.skip("no shared data")
    result = evaluate(
        model, tokenizer, f"counterfact:{DATA / 'counterfact_rome_sample500.json'}", "rome", "single",
        limit=2, generation_tokens=8, progress=False,
    )  # fmt: skip
    s, b = result.summary, result.baseline
    # The unedited model prefers the true answers; after the edit the new ones win at the edit prompt.
    assert b["efficacy_prob"] <= 0.5 < s["efficacy_prob"]
    assert s["reliability_tf"] > b["reliability_tf"]
    assert 0.5 <= s["locality_tf"] <= 1 and 0 <= s["neighborhood_prob"] <= 1
    assert s["fluency"] > 0 and s["consistency"] is not None
    # Scoring a case costs less than editing it.
    assert s["eval_seconds"] < s["edit_seconds"]


def test_results_read_back_from_json(tmp_path):
    runs = [
        EvaluationResult(
            "rome",
            "single",
            {"layer": 1},
            {"reliability_tf": 0.5},
            {"reliability_tf": 0.1},
            [{"case_id": "0"}],
        ),
        EvaluationResult("grace", "sequential", {}, {"reliability_tf": 1.0}, {}, [], [{"edits": 1}]),
    ]
    write_json(tmp_path / "one.json", runs[:1], {"model": "tiny"})
    write_json(tmp_path / "two.json", runs)
    assert read_json(tmp_path / "one.json") == runs[:1]  # the meta fields are not part of a run
    assert read_json(tmp_path / "two.json") == runs
