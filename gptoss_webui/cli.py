"""`python -m gptoss_webui <command>`: the same pipeline the UI drives, without the UI.

Each command parses its flags into the typed config (gptoss_webui.config) and calls the module that
does the work; errors meant for people (ConfigError and friends) print one clear message, exit 2.
"""

from __future__ import annotations

import argparse
import sys

from gptoss_webui.config import ConfigError
from gptoss_webui.presets import DEFAULT_PRESET


class UserError(Exception):
    """A problem the user can fix: printed without a traceback."""


def _add_recipe_args(p: argparse.ArgumentParser, default: str | None = DEFAULT_PRESET) -> None:
    p.add_argument("--config", default=default, help="preset name (see `presets`) or YAML file "
                   f"[default: {default}]")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set lora.r=16 (train.* and serve.* may be spelled out)")


def _recipe(args: argparse.Namespace, section: str):
    from gptoss_webui.config import in_section
    from gptoss_webui.presets import load_recipe

    return load_recipe(args.config, in_section(args.overrides, section))


# --- commands -----------------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> int:
    from gptoss_webui.demo import build_all

    built = build_all()
    print("Embedded demo ready (random weights, real o200k_harmony tokenizer):")
    for key, path in built.items():
        print(f"  {key:13s} {path}")
    print(f"Train it:  python -m gptoss_webui train --config {DEFAULT_PRESET}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from gptoss_webui.presets import load_preset, preset_names

    for name in preset_names():
        print(f"{name}\n    {load_preset(name).description}")
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from gptoss_webui.train.memory import estimate_for_recipe

    recipe = _recipe(args, "train")
    estimate = estimate_for_recipe(recipe.train)
    print(estimate.report())
    return 0 if estimate.fits else 1


def cmd_train(args: argparse.Namespace) -> int:
    from gptoss_webui.train.launcher import follow, launch, resume

    if args.resume:
        run = resume(args.resume, runs_dir=args.runs_dir, force=args.force, wait_in_queue=not args.no_queue)
    else:
        run = launch(_recipe(args, "train"), force=args.force, wait_in_queue=not args.no_queue)
    print(f"run folder: {run.path}\nlog: {run.log_path}")
    if args.detach:
        return 0
    return follow(run)


def cmd_stop(args: argparse.Namespace) -> int:
    from gptoss_webui.runs import RunsDir
    from gptoss_webui.train.launcher import stop

    run = RunsDir(args.runs_dir).get(args.run)
    print(stop(run))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from gptoss_webui.serve.merge import MergeError, merge_run

    try:
        out = merge_run(args.run, force=args.force)
    except MergeError as exc:
        raise UserError(str(exc)) from None
    print(f"merged model: {out}\nserve it:  python -m gptoss_webui serve --model {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from gptoss_webui.serve.command import serve_forever
    from gptoss_webui.serve.state import EngineError

    try:
        return serve_forever(args)
    except EngineError as exc:
        raise UserError(str(exc)) from None


def cmd_ui(args: argparse.Namespace) -> int:
    from gptoss_webui.ui.app import launch_from_args

    return launch_from_args(args)


# --- parser -------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gptoss_webui",
                                     description="Fine-tune gpt-oss with LoRA and serve it with vLLM.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("demo", help="build the embedded tiny gpt-oss, tokenizer and demo dataset"
                   ).set_defaults(func=cmd_demo)
    sub.add_parser("presets", help="list the shipped presets").set_defaults(func=cmd_presets)

    p = sub.add_parser("estimate", help="per-GPU memory estimate and verdict for a config")
    _add_recipe_args(p)
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("train", help="launch a training run (deepspeed) and follow its progress")
    _add_recipe_args(p)
    p.add_argument("--resume", metavar="RUN", help="continue a stopped or failed run from its last checkpoint")
    p.add_argument("--runs-dir", default="runs", help="where runs live (for --resume)")
    p.add_argument("--force", action="store_true", help="launch even if the estimate says it cannot fit")
    p.add_argument("--detach", action="store_true", help="return once launched instead of following")
    p.add_argument("--no-queue", action="store_true", help="refuse, instead of waiting in line, when another job "
                   "holds the GPUs")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("stop", help="stop a running training run (it saves a checkpoint first), or take a "
                       "queued one out of the queue")
    p.add_argument("run", help="run folder name")
    p.add_argument("--runs-dir", default="runs")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("merge", help="merge a finished run's adapter into its base model")
    p.add_argument("--run", required=True, help="run folder (path)")
    p.add_argument("--force", action="store_true", help="merge again even if run/merged is up to date")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("serve", help="start vLLM's OpenAI-compatible server on a model (+ adapters)")
    p.add_argument("--model", required=True, help="model folder, or demo:tiny-gpt-oss")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="LoRA adapter to load")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the base and serve that")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    _add_recipe_args(p, default=None)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ui", help="start the web UI")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth", help="user:password (required with a non-loopback --host; or GPTOSS_WEBUI_AUTH)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback host without auth")
    p.add_argument("--lang", choices=["en", "zh"], help="UI language (default: from the browser)")
    p.add_argument("--runs-dir", default="runs")
    p.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, UserError, FileNotFoundError, FileExistsError, PermissionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
