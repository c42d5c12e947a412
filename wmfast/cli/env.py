"""Print torch / triton / CUDA versions, the GPUs (via nvidia-ml-py when a driver is present), and which
backends (triton, cuda, torch) are usable here and why not."""
from __future__ import annotations


def add_arguments(p):
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    import json

    from wmfast.env import collect_env, format_env

    env = collect_env()
    print(json.dumps(env, indent=2) if args.json else format_env(env))
    return 0
