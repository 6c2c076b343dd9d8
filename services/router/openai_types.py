"""The OpenAI chat completions request, as pydantic models: what the HTTP front door (``services/router/http.py``)
accepts on ``POST /v1/chat/completions``.

Only types are checked here (strictly: a string is not a number, ``"true"`` is not a boolean); every range, count
and size rule is the pipeline's own ``validate``, so both front doors refuse the same requests with the same
messages (``services/router/openaiconv.py`` maps its field paths to the OpenAI parameter names).

Fields OpenAI defines but costmesh does not serve (tools, several choices, log probabilities, structured output,
penalties, logit bias) are accepted at their neutral values and refused otherwise with a 400 naming the parameter:
silently ignoring them would change what the caller gets. Fields OpenAI does not define are ignored, as vLLM's
OpenAI server ignores them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class ContentPart(BaseModel):
    """One part of a message's content; only ``{"type": "text", "text": ...}`` is served."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    #: Checked by the pipeline (system, user, assistant, tool; ``developer`` is OpenAI's newer name for system).
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The body of ``POST /v1/chat/completions``."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    #: The end user, for attribution (``costmesh.end_user``).
    user: str | None = None

    # --- defined by OpenAI, not served: refused unless neutral (openaiconv.unsupported) ---
    n: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
