"""`python -m gptoss_webui serve`: an engine from the command line, running until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Any

from gptoss_webui.config import Recipe, ServeConfig, in_section
from gptoss_webui.serve import plan, policy
from gptoss_webui.serve.engine import Engine
from gptoss_webui.serve.state import EngineError


def serve_config_from_args(args: argparse.Namespace) -> tuple[ServeConfig, dict[str, str]]:
    """The ServeConfig for `serve` flags: a recipe's serve section when --config is given, then the flags."""
    base = ServeConfig()
    overrides = in_section(getattr(args, "overrides", None) or [], "serve")
    if getattr(args, "config", None):
        from gptoss_webui.presets import load_recipe

        base = load_recipe(args.config, overrides).serve
    elif overrides:
        base = Recipe.from_dict({}, overrides).serve
    adapters = {}
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise EngineError(f"--adapter '{item}' must look like NAME=PATH")
        adapters[name] = path
    config = base.model_copy(update={"model": args.model, "host": args.host, "port": args.port})
    return ServeConfig.model_validate(config.model_dump()), adapters


def serve_forever(args: argparse.Namespace) -> int:
    """`serve`: start the engine, print the OpenAI base URL and model names, run until Ctrl-C. When this
    workspace's engine is already up (started by the UI or another `serve`), hot-load into it instead."""
    config, adapters = serve_config_from_args(args)
    mode: policy.AdapterMode = "merge" if args.merge else "auto"
    engine = Engine()
    if engine.status().live:
        return load_into_running(engine, config, adapters, mode)
    # SIGTERM (a supervisor, `kill`) ends the CLI like Ctrl-C does: the engine is stopped, not orphaned.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        info = engine.start(config, adapters=adapters, adapter_mode=mode,
                            progress=lambda m: print(m, flush=True))
        for note in info.notes:
            print(f"note: {note}")
        print(f"\nOpenAI base URL: {info.base_url}")
        print(f"models: {', '.join(engine.models())}")
        if info.api_key_env:
            print(f"API key: the value of ${info.api_key_env}")
        print("Ctrl-C stops the engine.", flush=True)
        while True:
            time.sleep(2.0)
            if engine.status().state == "crashed":
                print(f"error: the engine crashed: {engine.info.error}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        # A second Ctrl-C (or SIGTERM) must not end this process halfway and leave vLLM running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("\nstopping the engine...", flush=True)
        engine.stop()
        return 0


def load_into_running(engine: Engine, config: ServeConfig, adapters: dict[str, str],
                      mode: policy.AdapterMode) -> int:
    """Hot-load `adapters` into the engine already up in this workspace, where policy.serving_action says the
    running engine can take them. One engine per workspace: a second is never started beside it, and the
    engine stays with whoever started it, so what needs a restart is refused with the reason."""
    from gptoss_webui.sources import resolve_model

    info = engine.info
    where = f"an engine is already {info.state} in this workspace: '{info.served_name or info.model_spec}' on " \
            f"{info.base_url}"
    stop_first = "stop it first (Stop in the Serve tab, or Ctrl-C where `serve` runs)"
    same_model = config.model == info.model_spec or resolve_model(config.model) == info.model
    if not adapters or info.state != "running":
        hint = ("wait until it is running" if same_model and info.state == "starting" else
                "give --adapter NAME=PATH to hot-load into it" if same_model else stop_first)
        raise EngineError(f"{where}; {hint}")
    try:
        actions = {name: policy.serving_action(info, config, name, path, mode) for name, path in adapters.items()}
    except plan.PlanError as exc:
        raise EngineError(str(exc)) from None
    for name, action in actions.items():
        if action.kind != "hotload_running":
            raise EngineError(f"{where}; serving '{name}' needs a restart ({action.reason}): {stop_first}")
    for name, path in adapters.items():
        print(actions[name].reason, flush=True)
        print(engine.load_adapter(name, path).message, flush=True)
    print(f"\nOpenAI base URL: {info.base_url}")
    print(f"models: {', '.join(engine.models())}")
    print("The engine keeps running; it stays with whoever started it.")
    return 0


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt
