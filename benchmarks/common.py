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
    return f"{cpu_model()}, {torch.get_num_threads()} torch threads"


def cpu_model() -> str:
    """The CPU's model, family and bfloat16 support as /proc/cpuinfo gives them (timings differ by CPU)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return f"{platform.processor() or platform.machine()} CPU"
    flags = fields.get("flags", "").split()
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return (
        f"{fields.get('model name', platform.machine())} CPU (family {fields.get('cpu family', '?')}, model "
        f"{fields.get('model', '?')}; {', '.join(bf16) or 'no bfloat16 instructions'})"
    )
