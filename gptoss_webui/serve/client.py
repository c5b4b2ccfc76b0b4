"""HTTP to the engine's OpenAI-compatible server: health, models, raw completions, LoRA load and unload.

Errors come back as EngineError worded for the user, with the server's own message where it sent one;
EngineUnreachable when nothing answered, so the caller can add what it knows of the process.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import httpx

from gptoss_webui.serve.state import EngineError

# Fixed probe for "does the adapter change anything": greedy, so base and adapter are comparable.
PROBE_PROMPT = "The quick brown fox jumps over the lazy dog. Then it"
PROBE_TOKENS = 8


class EngineUnreachable(EngineError):
    """The server did not answer (connection refused, reset, timed out)."""


_http: tuple[int, httpx.Client] | None = None  # (pid, client): a forked child makes its own
_http_lock = threading.Lock()


def http() -> httpx.Client:
    """One pooled client for the process, shared by every thread. httpx.request() builds a client per call, SSL
    context included: 19 ms of CPU a request on the 2-core CPU machine, against 0.8 ms on a kept connection, and
    bench/serve.py sends hundreds of requests from up to 64 threads."""
    global _http
    with _http_lock:
        if _http is None or _http[0] != os.getpid():
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
            _http = (os.getpid(), httpx.Client(limits=limits))
        return _http[1]


def healthy(base_url: str, timeout: float) -> bool:
    """Does GET /health answer 200? (base_url ends in /v1, as EngineInfo.base_url does)"""
    try:
        return http().get(base_url.removesuffix("/v1") + "/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


class ServerClient:
    """The requests the app makes to one vLLM OpenAI server (chat goes through serve/chat.py)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 120.0) -> None:
        self.base_url, self.api_key, self.timeout_s = base_url, api_key, timeout_s

    def models(self) -> list[str]:
        data = self.request("GET", "/v1/models", None, "listing models")
        return [m["id"] for m in data.get("data", [])] if isinstance(data, dict) else []

    def complete(self, model: str, prompt: str | list[int], max_tokens: int = 16, **params: Any) -> dict:
        """A raw /v1/completions call (no chat template): greedy by default, with token ids returned."""
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                "return_token_ids": True, **params}
        return self.request("POST", "/v1/completions", body, f"completion from '{model}'")

    def probe(self, model: str) -> tuple[list[int], list[float]]:
        """Greedy ids and log-probs of the fixed probe prompt."""
        choice = self.complete(model, PROBE_PROMPT, PROBE_TOKENS, logprobs=1)["choices"][0]
        logprobs = list((choice.get("logprobs") or {}).get("token_logprobs") or [])
        return list(choice.get("token_ids") or []), logprobs

    def load_lora(self, name: str, path: str, fused_experts: bool) -> None:
        body: dict[str, Any] = {"lora_name": name, "lora_path": path}
        if fused_experts:
            # peft's fused 3-D expert layout (gpt-oss experts); vLLM consults it for mixed MoE formats only.
            body["is_3d_lora_weight"] = True
        self.request("POST", "/v1/load_lora_adapter", body, f"loading adapter '{name}'")

    def unload_lora(self, name: str) -> None:
        self.request("POST", "/v1/unload_lora_adapter", {"lora_name": name}, f"unloading adapter '{name}'")

    def request(self, method: str, path: str, body: dict | None, what: str) -> Any:
        url = self.base_url.removesuffix("/v1") + path
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            resp = http().request(method, url, json=body, headers=headers, timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            raise EngineUnreachable(f"{what} failed: the engine did not answer ({exc.__class__.__name__})"
                                    ) from None
        if resp.status_code >= 400:
            try:
                message = resp.json().get("error", {}).get("message") or resp.text
            except ValueError:
                message = resp.text
            raise EngineError(f"{what} failed: {message.strip()[:500]}")
        try:
            return resp.json()
        except ValueError:
            return resp.text
