"""The OpenAI completions API as JSON: requests checked field by field, responses and errors in its shapes.

    request = completion_request(json.loads(body))     # ApiError(400, ..., param) on a wrong field
    done = catalog.complete(request.model, request.prompt, request.max_tokens, request.temperature, request.seed)
    completion_response(request.model, done)           # what `openai.OpenAI(...).completions.create` parses
    error_body("unknown model 'x'", param="model")     # {"error": {"message", "type", "param", "code"}}

Departures from OpenAI, each on purpose: `temperature` defaults to 0 (greedy: an answer repeats
unless a client asks it to vary; OpenAI's default is 1); one prompt and one choice per request;
no streaming, stop sequences, logprobs, echo or suffix, which are refused rather than ignored so
that a client never reads an answer that silently broke its request.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

MAX_TOKENS_CAP = 512
"""The most tokens one request may ask for: bounds how long one request holds the model."""
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions

# Fields that would change the answer, with the only value served: anything else is refused.
_ONLY = {"n": (1,), "best_of": (1,), "stream": (False,), "echo": (False,), "stop": (None, [], ""), "suffix": (None, ""),
         "logprobs": (None,), "top_p": (1,), "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},)}


class ApiError(Exception):
    """An answer other than 200: HTTP status, message, and the request field at fault (or None)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompt: str
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    seed: int | None = None


def completion_request(body) -> CompletionRequest:
    """The request's fields, checked; ApiError(400) naming the first wrong one."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required: a model name from /v1/models", "model")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string (or a list of one string); token-id prompts and "
                            "several prompts per request are not served", "prompt")
    max_tokens = _field(body, "max_tokens", DEFAULT_MAX_TOKENS, int)
    if not 1 <= max_tokens <= MAX_TOKENS_CAP:
        raise ApiError(400, f"max_tokens must be between 1 and {MAX_TOKENS_CAP}, got {max_tokens}", "max_tokens")
    temperature = float(_field(body, "temperature", 0.0, (int, float)))
    if not 0 <= temperature <= 2:  # also refuses NaN, which json.loads accepts
        raise ApiError(400, f"temperature must be between 0 and 2, got {temperature}", "temperature")
    seed = _field(body, "seed", None, int)
    for name, served in _ONLY.items():
        value = body.get(name)
        if value is not None and value not in served:
            raise ApiError(400, f"{name}={value!r} is not supported here; only {served[0]!r}", name)
    return CompletionRequest(model, prompt, max_tokens, temperature, seed)


def _field(body: dict, name: str, default, kind):
    value = body.get(name)
    if value is None:
        return default
    # bool is an int to Python but not to a JSON client: true is no token count.
    if isinstance(value, bool) or not isinstance(value, kind) or (isinstance(value, float) and not math.isfinite(value)):
        wanted = "an integer" if kind is int else "a number"
        raise ApiError(400, f"{name} must be {wanted}, got {value!r}", name)
    return value


def completion_response(model: str, done) -> dict:
    """The completions response for one `Completion` (catalog.py)."""
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": done.text, "finish_reason": done.finish_reason, "logprobs": None}],
        "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                  "total_tokens": done.prompt_tokens + done.completion_tokens},
    }


def models_response(names: list[str], created: int) -> dict:
    return {"object": "list", "data": [model_entry(name, created) for name in names]}


def model_entry(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "tunepipe"}


def error_body(message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
