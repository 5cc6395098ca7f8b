"""What the benchmark scripts share: where the data and results live, and which device runs them."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

# The benchmark data sets (``shared/data`` beside the checkout); PEFT_EDIT_SHARED_DATA points elsewhere.
DATA = Path(os.environ.get("PEFT_EDIT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
RESULTS = Path(__file__).resolve().parent / "results"


def add_device_argument(parser) -> None:
    parser.add_argument(
        "--device", default=None, help="torch device for the model (default: cuda when available, else cpu)"
    )


def device_description(device: torch.device | str) -> str:
    """What ran the benchmark, for the results file: the GPU's name, or the CPU and its torch threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch threads"
