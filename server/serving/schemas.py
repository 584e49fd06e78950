"""The HTTP contract of ``fedtune serve``: OpenAI's request and response shapes as pydantic models.

FastAPI validates every request body against these models and writes ``/openapi.json`` from them,
so the document a gateway or a fuzzer reads is the code that runs. Request models are strict
(``"5"`` is not an int, ``true`` is not 1, NaN is not a temperature) and forbid unknown fields: a
parameter this server would silently ignore (``logprobs``, ``tools``...) is refused by name instead.
Only what fedtune implements is declared; OpenAI's documented names and ranges are kept.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

MAX_MODEL_NAME = 256
MAX_STOP = 4
MAX_MESSAGES = 1024
# A token count no context window reaches; the real bound (the model's context) is checked per
# request and answered with `context_length_exceeded`.
MAX_TOKENS_BOUND = 1 << 20

_REQUEST = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class TextPart(BaseModel):
    """One text part of a message's content (the only kind a text model reads)."""

    model_config = _REQUEST
    type: Literal["text"] = Field(description="Content part type; only `text` is supported.")
    text: str = Field(description="The text.")


class ChatMessage(BaseModel):
    """One turn of the conversation."""

    model_config = _REQUEST
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="Who wrote the turn; `developer` is read as `system`."
    )
    content: str | list[TextPart] = Field(description="The turn's text, or text parts.")
    name: str | None = Field(None, max_length=64, description="Accepted and ignored.")


class StreamOptions(BaseModel):
    model_config = _REQUEST
    include_usage: bool = Field(False, description="Send a last chunk with token usage.")


class _Sampling(BaseModel):
    """Fields that completions and chat completions share."""

    model_config = _REQUEST
    model: str = Field(
        min_length=1, max_length=MAX_MODEL_NAME, description="A model id from `/v1/models`."
    )
    max_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS_BOUND, description="Most tokens to generate (within context)."
    )
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    n: int = Field(1, ge=1, le=1, description="Choices per request; only 1 is served.")
    stop: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=4)]
        | None
    ) = Field(None, description=f"Up to {MAX_STOP} strings that end the generation.")
    stream: bool = Field(False, description="Send server-sent events, one chunk per delta.")
    stream_options: StreamOptions | None = Field(None, description="Only with `stream`.")
    seed: int | None = Field(
        None, ge=0, le=(1 << 63) - 1, description="Reproducible sampling (served unbatched)."
    )
    user: str | None = Field(None, max_length=256, description="Accepted and ignored.")


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: the model's chat template turns messages into a prompt."""

    messages: list[ChatMessage] = Field(
        min_length=1, max_length=MAX_MESSAGES, description="The conversation so far."
    )
    max_completion_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS_BOUND, description="Newer name of `max_tokens`; wins if both."
    )


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: plain text continuation."""

    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1)]
    ) = Field(description="The text to continue (a list of exactly one string is accepted).")


def request_models(
    model_ids: list[str], max_tokens: int
) -> tuple[type[ChatCompletionRequest], type[CompletionRequest]]:
    """The request models with this server's model ids and ``max_tokens`` bound in the document.

    The ids are listed as the schema's ``enum``, yet any string is parsed: an unknown id gets
    OpenAI's 404 ``model_not_found`` rather than a validation error.
    """
    model: Any = (str, Field(min_length=1, max_length=MAX_MODEL_NAME, json_schema_extra={
        "enum": list(model_ids)}, description="A model id from `/v1/models`."))  # fmt: skip
    most = f"Most tokens to generate: at most {max_tokens}, and prompt + this within the context."
    bound: Any = (int | None, Field(None, ge=1, le=max_tokens, description=most))
    chat = create_model("ChatCompletionRequest", __base__=ChatCompletionRequest,
                        __doc__=ChatCompletionRequest.__doc__, model=model, max_tokens=bound,
                        max_completion_tokens=bound)  # fmt: skip
    completion = create_model("CompletionRequest", __base__=CompletionRequest,
                              __doc__=CompletionRequest.__doc__, model=model,
                              max_tokens=bound)  # fmt: skip
    return chat, completion


def sse_event_schema(chunk_ref: str, error_ref: str) -> dict[str, Any]:
    """One server-sent event: ``data`` is a chunk (or an error) as JSON, or ``[DONE]``."""
    either = {"anyOf": [{"$ref": chunk_ref}, {"$ref": error_ref}]}
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": either}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data]}},
    }


# ------------------------------------------------------------------------------------ responses

FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion (``data: {...}``)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: None = None


class Completion(BaseModel):
    """A completion, or (with ``stream``) one event of it: streamed events carry no usage."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
    models: list[str]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, for every 4xx and 5xx."""

    error: ErrorBody
