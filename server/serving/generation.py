"""From a validated request to prompt token ids, and from generated ids back to text (no HTTP).

The pydantic models in :mod:`server.serving.schemas` have already checked types and ranges; what
needs the model is checked here: the model name, the chat template, the context window. Every
refusal is an :class:`ApiError` carrying an OpenAI-style error body, so the HTTP layer never
answers a bad request with a 500.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from server.serving.schemas import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger(__name__)

Kind = Literal["chat", "completion"]
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
DEFAULT_MAX_TOKENS: dict[Kind, int] = {"chat": 256, "completion": 16}
# Below this, sampling is argmax anyway, and logits / temperature overflow float32 near 1e-38.
GREEDY_BELOW = 1e-4


class ApiError(Exception):
    """A request the server will not serve; carries the HTTP status and an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status,
            message,
            param,
            code,
            type_,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass
class GenRequest:
    """A request ready to generate: which served model, prompt token ids, sampling settings."""

    kind: Kind
    model: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass
class GenResult:
    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int


# ------------------------------------------------------------------------------------ prompting


class Prompter:
    """Turns validated chat and completion requests into :class:`GenRequest` for one tokenizer."""

    def __init__(
        self, tokenizer: Any, context_length: int, model_ids: list[str], max_tokens: int
    ) -> None:
        self.tokenizer, self.context_length, self.model_ids = tokenizer, context_length, model_ids
        self.max_tokens = min(max_tokens, context_length)  # the most one request may ask for

    def chat(self, req: ChatCompletionRequest) -> GenRequest:
        self.check_model(req.model)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, "this model has no chat template; use /v1/completions", "messages")
        convo = [_message(m.role, m.content) for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(
                convo, tokenize=False, add_generation_prompt=True
            )
        except Exception as err:  # jinja templates raise their own errors on unsupported input
            raise ApiError(400, f"chat template rejected the messages: {err}", "messages") from None
        ids = self._encode(str(text), "messages", add_special_tokens=False)
        newer = req.max_completion_tokens is not None
        name = "max_completion_tokens" if newer else "max_tokens"
        asked = req.max_completion_tokens if newer else req.max_tokens
        return self._build("chat", req, ids, name, asked)

    def completion(self, req: CompletionRequest) -> GenRequest:
        self.check_model(req.model)
        prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        ids = self._encode(prompt, "prompt", add_special_tokens=True)
        return self._build("completion", req, ids, "max_tokens", req.max_tokens)

    def check_model(self, model: str) -> None:
        if model not in self.model_ids:
            served = ", ".join(f"`{m}`" for m in self.model_ids)
            raise ApiError(404, f"The model `{model}` does not exist; this server serves "
                           f"{served}", "model", "model_not_found")  # fmt: skip

    def _encode(self, text: str, param: str, add_special_tokens: bool) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (`"\ud800"`) is valid JSON, not text
            raise ApiError(400, f"`{param}` is not valid Unicode text", param) from None
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def _build(
        self,
        kind: Kind,
        req: ChatCompletionRequest | CompletionRequest,
        ids: list[int],
        name: str,
        asked: int | None,
    ) -> GenRequest:
        param = "messages" if kind == "chat" else "prompt"
        room = self.context_length - len(ids)
        if asked is not None and asked > self.max_tokens:
            raise ApiError(400, f"`{name}` must be at most {self.max_tokens} on this server, "
                           f"got {asked}", name)  # fmt: skip
        if room < 1 or (asked is not None and asked > room):
            raise ApiError(400, f"This model's maximum context length is {self.context_length} "
                           f"tokens; the request has {len(ids)} prompt tokens and asks for "
                           f"{asked or 1} more", param, "context_length_exceeded")  # fmt: skip
        default = min(DEFAULT_MAX_TOKENS[kind], room, self.max_tokens)
        max_tokens = asked if asked is not None else default
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        options = req.stream_options
        return GenRequest(
            kind,
            req.model,
            ids,
            max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=stop,
            stream=req.stream,
            include_usage=bool(options and options.include_usage),
            seed=req.seed,
        )


def _message(role: str, content: str | list[Any]) -> dict[str, str]:
    text = content if isinstance(content, str) else "".join(part.text for part in content)
    return {"role": _ROLES[role], "content": text}


# -------------------------------------------------------------------------------------- decoding


class TextSink:
    """One request's generated ids, turned into text deltas and cut at its stop strings.

    ``put`` gets one token at a time; ``done`` turns true at the end-of-sequence token, at a stop
    string, or when the request has its ``max_tokens``; later tokens (padding of a batch) are
    dropped. Deltas are held back while they could still be the start of a stop string or half of
    a multi-byte character.
    """

    def __init__(
        self,
        tokenizer: Any,
        req: GenRequest,
        eos_ids: set[int],
        emit: Callable[[str], None],
    ) -> None:
        self.tokenizer, self.req, self.eos_ids, self.emit = tokenizer, req, eos_ids, emit
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already emitted
        self.hit_stop = self.hit_eos = self.cancelled = False

    @property
    def done(self) -> bool:
        full = len(self.ids) >= self.req.max_tokens
        return self.hit_stop or self.hit_eos or self.cancelled or full

    def put(self, token: int) -> None:
        if self.done:
            return
        self.ids.append(token)
        self.hit_eos = token in self.eos_ids
        self._flush(final=self.done)

    def result(self) -> GenResult:
        if not (self.hit_stop or self.cancelled):
            self._flush(final=True)
        length = len(self.ids) >= self.req.max_tokens and not (self.hit_eos or self.hit_stop)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return GenResult(
            text[: self.sent],
            "length" if length else "stop",
            len(self.req.prompt_ids),
            len(self.ids),
        )

    def _flush(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        stops = self.req.stop
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit_stop = True
            end = cut
        elif final:
            end = len(text)
        elif text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        else:  # hold back a tail that could still become a stop string
            end = len(text) - max((_overlap(text, s) for s in stops), default=0)
        if end > self.sent:
            delta, self.sent = text[self.sent : end], end
            self.emit(delta)


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


def context_length(model: Any, tokenizer: Any) -> int:
    cfg = model.config
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < n:
        n = tok_max
    return int(n)


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    found: set[int] = set()
    for value in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, list):
            found.update(int(v) for v in value)
    return found
