"""Launching the web UI: the access policy (loopback, auth), upload limits, then the page (page.py)."""

from __future__ import annotations

import argparse
import sys

from gptoss_webui.ui.access import MAX_UPLOAD, AccessError, resolve_auth


def build_app(runs_dir: str = "runs", lang: str | None = None):
    """The Blocks app (see page.py); imported lazily so a refused launch exits before gradio loads."""
    from gptoss_webui.ui.page import build_page

    return build_page(runs_dir, lang)


def launch_from_args(args: argparse.Namespace) -> int:
    """`python -m gptoss_webui ui` and webui.py: check the access policy, then serve the page."""
    try:
        auth = resolve_auth(args.host, args.auth, args.insecure)
    except AccessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import gradio as gr

    from gptoss_webui.ui.page import CSS

    demo = build_app(args.runs_dir, args.lang)
    demo.queue(default_concurrency_limit=4)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        auth=auth,
        auth_message="gpt-oss WebUI",
        max_file_size=MAX_UPLOAD,
        footer_links=["settings"],
        show_error=False,
        css=CSS,
        theme=gr.themes.Soft(),
        ssr_mode=False,
        quiet=False,
    )
    return 0
