"""The ``peft-edit`` command.

peft-edit info ADAPTER_DIR      # method, base model, targeted modules and the edits it holds
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _info(args: argparse.Namespace) -> int:
    config_path = Path(args.adapter) / "adapter_config.json"
    if not config_path.is_file():
        print(
            f"peft-edit: {config_path} not found; give a folder written by save_pretrained.", file=sys.stderr
        )
        return 2
    config = json.loads(config_path.read_text())
    peft_type = str(config.get("peft_type", ""))
    method = peft_type.split(" ", 1)[0].lower()
    if "edits" not in config:
        print(
            f"peft-edit: {args.adapter} holds a {peft_type} adapter, not a peft-edit adapter.",
            file=sys.stderr,
        )
        return 2
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="peft-edit", description="Edit the knowledge of language models as PEFT adapters."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="what a saved edit adapter holds")
    info.add_argument("adapter", help="folder with adapter_config.json")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(run=_info)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
