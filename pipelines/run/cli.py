"""The `moda` command line.

    moda synth configs/demo.yaml          generate the synthetic demo data
    moda run configs/demo.yaml            run the pipeline in-process (no server)
    moda run configs/demo.yaml --stages cluster,split
    moda sweep configs/sweep-cpu.yaml     the scaling-law sweep: models x budgets, laws fitted
    moda stage split configs/demo.yaml    one stage, directly (no Prefect)
    moda verify runs/demo                 check the split from the files alone
    moda add-expert configs/demo.yaml --mode split-widest     (or new-data --new-data DIR, task --task DIR)
    moda predict runs/demo img.jpg --classes circle,square,star
    moda predict runs/demo img.jpg --captions "a red circle" "a forest"
    moda export runs/demo bundles/demo    the trained system as one folder (a model hub's layout)
    moda infer bundles/demo 'shards/{00000..00099}.tar' --classes classes.txt --out preds/
    moda serve bundles/demo --port 8000   the routed ensemble over HTTP
    moda demo                             the full demo through a local Prefect server
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import sys
from pathlib import Path

from PIL import Image

from experts.split.verify import INPUT_MODES, verify_split
from pipelines.core.config import ConfigError, load_config, merge_settings, parse_setting
from pipelines.core.devices import usable_cores
from pipelines.core.layout import RunLayout
from pipelines.run.add_expert import AddRequest
from pipelines.run.demo import main as demo_main
from pipelines.run.demo import ui as demo_ui
from pipelines.run.estimate import estimate_config, stated_line
from pipelines.run.progress import Watcher
from pipelines.run.stages import NAMES, run_stage
from pipelines.shardio.shards import ShardError
from pipelines.synth.generate import generate
from serving.export import export
from serving.infer import InferRequest, infer, read_lines
from serving.predict import MoDESystem


def _synth(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    summary = generate(cfg.synth, args.out, args.processes or usable_cores())
    print(json.dumps({"train_samples": summary["train_samples"], "eval": summary["eval"]}))
    return 0


# Without a server, `moda run` starts Prefect's ephemeral one; its 30 s start-up limit was seen
# to run out on a loaded 2-core machine. A value the user set is kept.
EPHEMERAL_STARTUP_SECONDS = "180"


def _moda_flow(name: str = "moda"):
    """The `moda` flow (or another of pipelines/run/flows.py). The Prefect layer is imported only by
    the commands that start a flow: Prefect's import takes about 2 s, which `moda stage`, `moda
    verify` and `moda predict` do not pay."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", EPHEMERAL_STARTUP_SECONDS)
    import pipelines.run.flows as flows

    return getattr(flows, name)


def overrides(args: argparse.Namespace) -> dict:
    """`--set section.key=value` (repeatable) and `--seeds K`, as config overrides."""
    settings = [parse_setting(text) for text in getattr(args, "set", None) or []]
    if getattr(args, "seeds", None):
        settings.append({"report": {"seeds": args.seeds}})
    return merge_settings(settings)


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, overrides(args))  # fail fast, before Prefect starts
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
    # a line when a stage starts, ends or moves (shards, epochs), read from the run folder
    watcher = Watcher(RunLayout.of(cfg.name, args.run_dir), interval=10.0)
    watcher.start()
    try:
        table = _moda_flow()(config_path=args.config, run_dir=args.run_dir, stages=stages,
                             overrides=overrides(args) or None)
    finally:
        watcher.stop()
    if table:
        print(table)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    load_config(args.config, overrides(args))  # fail fast, before Prefect starts
    print(_moda_flow("sweep")(config_path=args.config, run_dir=args.run_dir, overrides=overrides(args) or None))
    return 0


def _predict(args: argparse.Namespace) -> int:
    if bool(args.classes) == bool(args.captions):
        print("moda: error: give exactly one of --classes or --captions", file=sys.stderr)
        return 2
    system = MoDESystem.load(args.run_dir, routing=args.routing)
    images = [Image.open(p).convert("RGB") for p in args.images]
    if args.classes:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
        probs, weights = system.classify(images, classes, args.template or None)
        out = [{"image": p, "top": [{"class": classes[j], "prob": round(float(probs[i, j]), 4)}
                                    for j in probs[i].argsort()[::-1][: args.top]]}
               for i, p in enumerate(args.images)]
    else:
        out = []
        for p, image in zip(args.images, images):
            scores, weights = system.rank_captions(image, args.captions)
            order = scores.argsort()[::-1][: args.top]
            out.append({"image": p, "top": [{"caption": args.captions[j], "score": round(float(scores[j]), 4)}
                                            for j in order]})
    print(json.dumps({"routing_weights": dict(zip(system.expert_names, map(float, weights))),
                      "predictions": out}, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    out, written = export(args.run_dir, args.out, overwrite=args.overwrite)
    print(f"moda export: {'wrote' if written else 'up to date (same trained system)'} {out}")
    return 0


def _infer(args: argparse.Namespace) -> int:
    request = InferRequest(classes=read_lines(args.classes, "--classes") if args.classes else (),
                           templates=read_lines(args.templates, "--templates") if args.templates else (),
                           embed=args.embed, top_k=args.top_k, top_experts=args.top_experts,
                           batch_size=args.batch_size, workers=args.workers, missing_shards=args.missing_shards)
    request.check()
    system = MoDESystem.load(args.system, device=args.device)
    summary = infer(system, args.shards, args.out, request)
    print(f"moda infer: {summary['rows']} samples in {summary['shards']} shards "
          f"({summary['shards_skipped_as_done']} done before), {summary['unreadable']} unreadable, "
          f"{len(summary['missing_shards'])} shards missing, {len(summary['damaged_shards'])} damaged: "
          f"{Path(args.out) / 'infer.json'}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from serving.service import Limits, create_app

    system = MoDESystem.load(args.system, device=args.device)
    limits = Limits(max_body_bytes=int(args.max_body_mb * 2**20), max_batch=args.max_batch, wait_ms=args.wait_ms)
    uvicorn.run(create_app(system, limits), host=args.host, port=args.port, log_level="warning")
    return 0


def _estimate(args: argparse.Namespace) -> int:
    estimate = estimate_config(Path(args.config), sweep=args.sweep, samples=args.samples, gpu=args.gpu,
                               gpus=args.gpus, mfu=args.mfu)
    print("\n".join(estimate.lines() + [stated_line(estimate)]))
    return 0


def _stage(args: argparse.Namespace) -> int:
    manifest = run_stage(args.stage, load_config(args.config, overrides(args)), args.run_dir)
    state = "skipped" if manifest.get("skipped") else f"done in {manifest['seconds']} s"
    print(json.dumps({"stage": args.stage, "state": state, "counts": manifest.get("counts", {})}))
    return 0


def _verify(args: argparse.Namespace) -> int:
    problems, summary = verify_split(args.run_dir, args.inputs)
    print(json.dumps(summary))
    for problem in problems:
        print(f"moda verify: {problem}", file=sys.stderr)
    if problems:
        print(f"moda verify: FAILED with {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print("moda verify: OK: samples in = samples in experts + rejected, no duplicates")
    return 0


def _add_expert(args: argparse.Namespace) -> int:
    load_config(args.config, overrides(args))
    request = {"mode": args.mode, "new_data": args.new_data or "", "task": args.task or "",
               "classnames": [c.strip() for c in (args.classes or "").split(",") if c.strip()],
               "templates": args.template or []}
    AddRequest.from_dict(request).check()  # a bad request fails before Prefect starts
    stages = [] if args.no_evaluate else ["evaluate", "report"]
    table = _moda_flow()(config_path=args.config, run_dir=args.run_dir, stages=stages, add_expert=request,
                         overrides=overrides(args) or None)
    if table:
        print(table)
    return 0


def _demo(args: argparse.Namespace) -> int:
    return demo_main(args.config)


def _ui(args: argparse.Namespace) -> int:
    return demo_ui(args.port)


# Offline by default, as `make` sets them: outside make, `moda run` logged an ERROR each time Prefect's
# telemetry could not reach the internet (a cluster node's usual state). A value the user set is kept.
OFFLINE_DEFAULTS = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


def offline_defaults() -> dict[str, str]:
    """Put OFFLINE_DEFAULTS in this process's environment (and its children's), keeping the user's."""
    return {name: os.environ.setdefault(name, value) for name, value in OFFLINE_DEFAULTS.items()}


def main(argv: list[str] | None = None) -> int:
    offline_defaults()
    parser = argparse.ArgumentParser(prog="moda", description="Mixture of Data Experts CLIP pipeline")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help="generate the synthetic demo data set")
    p.add_argument("config")
    p.add_argument("--out", default=None, help="output folder (default: synth.out_dir)")
    p.add_argument("--processes", type=int, default=0,
                   help="processes writing the training shards (default: one per usable core); same bytes")
    p.set_defaults(func=_synth)
    p = sub.add_parser("run", help="run the pipeline in-process (Prefect ephemeral mode)")
    p.add_argument("config")
    p.add_argument("--run-dir", default=None, help="run folder (default: runs/<name>)")
    p.add_argument("--stages", default=None, help=f"comma-separated subset of {','.join(NAMES)}")
    p.add_argument("--seeds", type=int, default=None, help="trainer seeds (report.seeds): train everything K times")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    p.set_defaults(func=_run)
    p = sub.add_parser("sweep", help="the scaling-law sweep: every model x budget point, then the fitted laws")
    p.add_argument("config")
    p.add_argument("--run-dir", default=None, help="run folder (default: runs/<name>)")
    p.add_argument("--seeds", type=int, default=None, help="trainer seeds per point (report.seeds)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    p.set_defaults(func=_sweep)
    p = sub.add_parser("estimate", help="launches, FLOPs, disk and wall time of a run on a GPU, before it runs")
    p.add_argument("config")
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=None,
                   help="estimate `moda sweep` (default: when the config lists sweep.models)")
    p.add_argument("--samples", type=int, default=None, help="training pairs (default: counted from the data)")
    p.add_argument("--gpu", choices=["h100", "h200"], default="h100")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--mfu", type=float, default=0.10, help="assumed model FLOPs utilisation (default 0.10)")
    p.set_defaults(func=_estimate)
    p = sub.add_parser("stage", help="run one stage directly, without Prefect")
    p.add_argument("stage", choices=list(NAMES))
    p.add_argument("config")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    p.set_defaults(func=_stage)
    p = sub.add_parser("verify", help="check that the split lost and duplicated nothing (exit 1 if it did)")
    p.add_argument("run_dir")
    p.add_argument("--inputs", choices=INPUT_MODES, default="read",
                   help="the input shards' keys: read again from the shards (default), or as the embed stage "
                        "recorded them once the shards are shown unchanged (no second download of remote data)")
    p.set_defaults(func=_verify)
    p = sub.add_parser("predict", help="classify images or rank captions with a trained MoDE system")
    p.add_argument("run_dir", help="a run folder (runs/demo) or a bundle (moda export)")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--classes", help="comma-separated class names")
    p.add_argument("--template", action="append", help="prompt template with {} (repeatable)")
    p.add_argument("--captions", nargs="+", help="candidate captions to rank")
    p.add_argument("--routing", default=None, choices=["paper", "released"],
                   help="routing formula (default: the one the run was evaluated with)")
    p.add_argument("--top", type=int, default=3)
    p.set_defaults(func=_predict)
    p = sub.add_parser("export", help="write a trained run's system as one portable folder (a bundle)")
    p.add_argument("run_dir")
    p.add_argument("out")
    p.add_argument("--overwrite", action="store_true", help="replace a folder that holds something else")
    p.set_defaults(func=_export)
    p = sub.add_parser("infer", help="zero-shot labels or per-expert embeddings for a shard set, one parquet a shard")
    p.add_argument("system", help="a bundle or a run folder")
    p.add_argument("shards", help="a folder, glob or brace pattern of tar shards; local, s3:// or any fsspec URL")
    p.add_argument("--out", required=True, help="output folder (one <shard>.parquet each, infer.json)")
    p.add_argument("--classes", help="class names, one a line")
    p.add_argument("--templates", help="prompt templates with {}, one a line (default: 'a photo of a {}.')")
    p.add_argument("--embed", action="store_true", help="write each expert's image embedding instead of labels")
    p.add_argument("--top-k", type=int, default=5, help="classes kept per image")
    p.add_argument("--top-experts", type=int, default=None,
                   help="run only the k experts with the largest routing weights (renormalised)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=-1, help="decode threads (-1: 2 on a CPU, the cores on a GPU)")
    p.add_argument("--missing-shards", choices=["error", "skip"], default="error")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_infer)
    p = sub.add_parser("serve", help="serve the routed ensemble over HTTP (classify, rank, embed, health, info)")
    p.add_argument("system", help="a bundle or a run folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto")
    p.add_argument("--max-body-mb", type=float, default=32.0)
    p.add_argument("--max-batch", type=int, default=64, help="images per model call, from all waiting requests")
    p.add_argument("--wait-ms", type=float, default=5.0, help="how long a request waits for others to batch with")
    p.set_defaults(func=_serve)
    p = sub.add_parser("add-expert", help="train one more expert later, existing experts untouched")
    p.add_argument("config")
    p.add_argument("--mode", required=True, choices=["new-data", "split-widest", "task"])
    p.add_argument("--new-data", help="new-data: the new shards (folder, glob or brace pattern; a path, URL or pipe:)")
    p.add_argument("--task", help="task: a task folder with task.json")
    p.add_argument("--classes", help="task: comma-separated class names (instead of --task)")
    p.add_argument("--template", action="append", help="task: prompt template with {} (repeatable)")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--no-evaluate", action="store_true", help="only add the expert, do not re-evaluate")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    p.set_defaults(func=_add_expert)
    p = sub.add_parser("demo", help="run the demo through a local Prefect server and worker")
    p.add_argument("--config", default="configs/demo.yaml")
    p.set_defaults(func=_demo)
    p = sub.add_parser("ui", help="start the Prefect server on the demo's database and print its address")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    p.set_defaults(func=_ui)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, ShardError, OSError) as err:  # a user's mistake or the machine's state
        if args.debug:
            raise
        print(f"moda: error: {os_error_line(err) if isinstance(err, OSError) and err.errno else err}",
              file=sys.stderr)
        return 2


def os_error_line(err: OSError) -> str:
    """An operating-system error as one line: what failed, on which path, and what to do."""
    path = err.filename or "(a file the stage was writing)"
    where = Path(path).parent if err.filename else Path.cwd()
    if err.errno == errno.ENOSPC or err.errno == errno.EDQUOT:
        free = shutil.disk_usage(where if where.exists() else Path.cwd()).free
        return (f"no space left writing {path} ({free / 2**30:.2f} GiB free there): free some space or move "
                "the run folder (--run-dir) to a larger disk, then run the same command again; finished "
                "work is kept and resumed")
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied on {path}: make it writable (or readable) by this user, or use another --run-dir"
    if err.errno == errno.EROFS:
        return f"{path} is on a read-only file system: choose a writable --run-dir"
    if err.errno == errno.ENOENT:
        return f"{path} does not exist: check the path in the config (data.*) or the command line"
    return f"{err.strerror or err} ({path})"


if __name__ == "__main__":
    sys.exit(main())
