"""The `moda` command line.

    moda synth configs/demo.yaml          generate the synthetic demo data
    moda run configs/demo.yaml            run the pipeline in-process (no server)
    moda run configs/demo.yaml --stages cluster,split
    moda demo                             the full demo through a local Prefect server
"""

from __future__ import annotations

import argparse
import json
import sys

from pipelines.config import ConfigError, load_config


def _synth(args: argparse.Namespace) -> int:
    from pipelines.synth import generate

    cfg = load_config(args.config)
    summary = generate(cfg.synth, args.out)
    print(json.dumps({"train_samples": summary["train_samples"], "eval": summary["eval"]}))
    return 0


def _run(args: argparse.Namespace) -> int:
    from pipelines.flows import moda

    load_config(args.config)  # fail fast, before Prefect starts
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
    table = moda(config_path=args.config, run_dir=args.run_dir, stages=stages)
    if table:
        print(table)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pipelines.demo import main as demo_main

    return demo_main(args.config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moda", description="Mixture of Data Experts CLIP pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help="generate the synthetic demo data set")
    p.add_argument("config")
    p.add_argument("--out", default=None, help="output folder (default: synth.out_dir)")
    p.set_defaults(func=_synth)
    p = sub.add_parser("run", help="run the pipeline in-process (Prefect ephemeral mode)")
    p.add_argument("config")
    p.add_argument("--run-dir", default=None, help="run folder (default: runs/<name>)")
    p.add_argument("--stages", default=None, help="comma-separated subset of embed,cluster,split,train,evaluate")
    p.set_defaults(func=_run)
    p = sub.add_parser("demo", help="run the demo through a local Prefect server and worker")
    p.add_argument("--config", default="configs/demo.yaml")
    p.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"moda: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
