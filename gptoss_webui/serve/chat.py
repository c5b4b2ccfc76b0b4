"""Streaming chat against the engine (the `openai` package), as generators the Gradio Chat tab consumes.

    client = ChatClient.for_engine(engine)             # or ChatClient(base_url, model_type="gpt_oss")
    for reply in client.stream(messages, model="tiny-gpt-oss", params=SamplingParams(temperature=0)):
        show(reply.reasoning, reply.content)            # accumulated so far; reply.done at the end
    for replies in client.compare("Hi", ["tiny-dense", "my-adapter"]):   # base vs adapter, side by side
        show(replies["tiny-dense"].content, replies["my-adapter"].content)

gpt-oss answers in harmony: its analysis channel (the reasoning) arrives in the delta field `reasoning`
(vLLM 0.32; older releases called it `reasoning_content`), the final channel in `content`. Cancel a
stream with a `CancelToken` from any thread: the HTTP stream is closed, which makes vLLM abort the request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from gptoss_webui.messages import Message, say

ReasoningEffort = Literal["low", "medium", "high"]
CUT_OFF = say("serving.chat.cut_off")


class ChatError(Exception):
    """A chat request that failed, worded for the user."""


class CancelToken:
    """Set from a Stop button's handler (any thread): the running stream's connection is closed at once,
    so a request still in prefill stops too, and vLLM aborts it."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    def cancel(self) -> None:
        with self._lock:
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            with contextlib.suppress(Exception):
                callback()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def on_cancel(self, callback: Callable[[], None]) -> None:
        """Run callback on cancel (at once if already cancelled)."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        callback()


@dataclass
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 512
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    reasoning_effort: ReasoningEffort | None = "medium"  # used for gpt-oss only

    @classmethod
    def from_config(cls, serve: Any) -> SamplingParams:
        """Defaults from a ServeConfig (temperature, top_p, max_tokens, reasoning_effort)."""
        return cls(temperature=serve.temperature, top_p=serve.top_p, max_tokens=serve.max_tokens,
                   reasoning_effort=serve.reasoning_effort)


@dataclass
class ChatReply:
    """One assistant answer as it grows; every yield is a fresh snapshot."""

    model: str
    reasoning: str = ""       # harmony analysis channel (gpt-oss), shown apart from the answer
    content: str = ""         # the final answer
    token_ids: list[int] = field(default_factory=list)         # generated ids (when return_token_ids)
    prompt_token_ids: list[int] = field(default_factory=list)  # the rendered prompt's ids
    finish_reason: str | None = None
    done: bool = False
    cancelled: bool = False
    error: Message | str | None = None  # str() is English; messages.text(error, lang) for the UI
    started_at: float = field(default_factory=time.time)
    first_token_s: float | None = None  # latency to the first streamed text
    elapsed_s: float = 0.0

    def snapshot(self) -> ChatReply:
        return dataclasses.replace(self, token_ids=list(self.token_ids),
                                   prompt_token_ids=list(self.prompt_token_ids))


class ChatClient:
    def __init__(self, base_url: str, api_key: str | None = None, model_type: str = "",
                 timeout_s: float = 600.0) -> None:
        from openai import OpenAI

        self.base_url = base_url
        self.model_type = model_type
        # No retries: a retried chat request would silently restart generation.
        self._client = OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout_s, max_retries=0)

    @classmethod
    def for_engine(cls, engine: Any) -> ChatClient:
        """A client for a running gptoss_webui.serve.engine.Engine."""
        info = engine.status()
        if info.state != "running":
            raise ChatError(say("serving.chat.not_running", state=info.state))
        return cls(info.base_url, engine.api_key, info.model_type)

    @property
    def harmony(self) -> bool:
        return self.model_type == "gpt_oss"

    def models(self) -> list[str]:
        try:
            return [m.id for m in self._client.models.list().data]
        except Exception as exc:  # openai's errors carry the server message; keep it, drop the traceback
            raise ChatError(_message(exc)) from None

    def stream(self, messages: list[dict[str, str]], model: str, params: SamplingParams | None = None,
               cancel: CancelToken | None = None, return_token_ids: bool = False) -> Iterator[ChatReply]:
        """Yield the growing reply for `messages` (role/content dicts, oldest first); the last one is done."""
        params = params or SamplingParams()
        reply = ChatReply(model=model)
        kwargs: dict[str, Any] = dict(model=model, messages=_clean(messages), stream=True,
                                      temperature=params.temperature, top_p=params.top_p,
                                      max_tokens=params.max_tokens)
        if params.seed is not None:
            kwargs["seed"] = params.seed
        if params.stop:
            kwargs["stop"] = params.stop
        if self.harmony and params.reasoning_effort:
            kwargs["reasoning_effort"] = params.reasoning_effort
        extra = {k: v for k, v in (("top_k", params.top_k), ("repetition_penalty", params.repetition_penalty))
                 if v is not None}
        if return_token_ids:
            extra["return_token_ids"] = True
        if extra:
            kwargs["extra_body"] = extra
        try:
            stream = self._client.chat.completions.create(**kwargs)
        except Exception as exc:
            raise ChatError(say("serving.chat.model_error", model=model, error=_message(exc))) from None
        if cancel is not None:
            cancel.on_cancel(stream.close)  # disconnecting is what makes vLLM abort the request
        try:
            for chunk in stream:
                if cancel is not None and cancel.cancelled:
                    break
                if _absorb(reply, chunk):
                    yield reply.snapshot()
        except Exception as exc:
            if not (cancel is not None and cancel.cancelled):  # else: the read was cut by our own close
                if _cut_off(exc):
                    raise ChatError(say("serving.chat.model_error", model=model, error=CUT_OFF)) from None
                raise ChatError(say("serving.chat.model_error", model=model, error=_message(exc))) from None
        finally:
            stream.close()
        reply.cancelled = cancel is not None and cancel.cancelled and reply.finish_reason is None
        reply.done, reply.elapsed_s = True, time.time() - reply.started_at
        yield reply.snapshot()

    def complete(self, messages: list[dict[str, str]], model: str, params: SamplingParams | None = None,
                 return_token_ids: bool = False) -> ChatReply:
        """The whole streamed reply at once."""
        last = ChatReply(model=model)
        for reply in self.stream(messages, model, params, return_token_ids=return_token_ids):
            last = reply
        return last

    def compare(self, prompt: str | list[dict[str, str]], models: list[str],
                params: SamplingParams | None = None,
                cancel: CancelToken | None = None) -> Iterator[dict[str, ChatReply]]:
        """Stream the same prompt to several models at once (base vs adapter); yields {model: reply}.

        A model that fails gets its `error` set; the others carry on.
        """
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        latest = {m: ChatReply(model=m) for m in models}
        updates: queue.Queue[ChatReply | None] = queue.Queue()

        def run(model: str) -> None:
            try:
                for reply in self.stream(messages, model, params, cancel):
                    updates.put(reply)
            except ChatError as exc:
                updates.put(dataclasses.replace(latest[model], error=exc.args[0] if exc.args else str(exc), done=True))
            finally:
                updates.put(None)

        threads = [threading.Thread(target=run, args=(m,), daemon=True) for m in models]
        for t in threads:
            t.start()
        running = len(threads)
        while running:
            item = updates.get()
            if item is None:
                running -= 1
                continue
            latest[item.model] = item
            yield dict(latest)
        for t in threads:
            t.join()


def _absorb(reply: ChatReply, chunk: Any) -> bool:
    """Add one streamed chunk to the reply; True when something visible changed."""
    extra = chunk.model_extra or {}
    if extra.get("prompt_token_ids"):
        reply.prompt_token_ids = list(extra["prompt_token_ids"])
    changed = False
    for choice in chunk.choices:
        delta = choice.delta
        dx = (delta.model_extra or {}) if delta is not None else {}
        thought = dx.get("reasoning") or dx.get("reasoning_content") or ""
        text = (delta.content if delta is not None else None) or ""
        if thought or text:
            reply.reasoning += thought
            reply.content += text
            if reply.first_token_s is None:
                reply.first_token_s = time.time() - reply.started_at
            changed = True
        ids = (choice.model_extra or {}).get("token_ids")
        if ids:
            # Progress even when the text is held back (harmony emits a message once its channel is known).
            reply.token_ids.extend(ids)
            changed = True
        if choice.finish_reason:
            reply.finish_reason = choice.finish_reason
            changed = True
    return changed


def _clean(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Only role/content go to the server: earlier turns' reasoning is not sent back (harmony drops it)."""
    out = []
    for m in messages:
        if m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ChatError(say("serving.chat.role", role=repr(m.get("role"))))
        out.append({"role": m["role"], "content": m.get("content") or ""})
    return out


def _cut_off(exc: Exception) -> bool:
    """A stream broken by the server going away (connection closed or reset mid-body), not an error it sent."""
    import httpx
    import openai

    return isinstance(exc, (httpx.TransportError, openai.APIConnectionError))


def _message(exc: Exception) -> str:
    """The server's own error text when there is one (openai.APIStatusError), else the exception's."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if body.get("message"):
            return str(body["message"])
    name = type(exc).__name__
    if name == "APIConnectionError":
        return "cannot reach the engine (is it running?)"
    return f"{name}: {exc}"
