"""Random text prefixes put in front of edit prompts, so an edit does not depend on the exact wording before it.

ROME and MEMIT average the key over, and optimise the value across, the prompt preceded by short
texts the model itself writes. They are sampled once per model and reused for every edit.
"""

from __future__ import annotations

import torch

from .requests import pad_token_id

START_WORDS = ("The", "Therefore", "Because", "I", "You")


def sample_context_templates(
    model, tokenizer, lengths: tuple[int, ...] | list[int], per_length: int, seed: int = 0
) -> list[str]:
    """``["{}"] + ["<sampled text>. {}", ...]``: ``per_length`` prefixes of each token length.

    Sampling is seeded and leaves the global random state untouched, so the same model gives the
    same templates on every run.
    """
    templates = ["{}"]
    device = next(model.parameters()).device
    pad_id = pad_token_id(tokenizer)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for length in lengths:
            starts = [START_WORDS[i % len(START_WORDS)] for i in range(per_length)]
            encoded = [tokenizer(s)["input_ids"] for s in starts]
            width = max(len(e) for e in encoded)
            # Left-pad so every row continues from its last real token.
            input_ids = torch.tensor([[pad_id] * (width - len(e)) + e for e in encoded], device=device)
            attention_mask = torch.tensor(
                [[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device
            )
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=True,
                top_k=5,
                max_new_tokens=length,
                min_new_tokens=length,
                pad_token_id=pad_id,
            )
            for row, e in zip(out, encoded):
                text = tokenizer.decode(row[width - len(e) :], skip_special_tokens=True)
                text = " ".join(text.replace("{", " ").replace("}", " ").split())
                templates.append(text + ". {}")
    return templates
