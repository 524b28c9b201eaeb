"""Rows that fail validation (`Reject`) and chat messages: parsed, checked and normalised.

A conversation is a JSON list of {"role", "content"} messages (roles system, user, assistant),
or ShareGPT's {"from", "value"} turns (human, gpt, system), mapped to the former.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pipeline.data.normalize import Normalizer

CHAT_ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


@dataclass(frozen=True)
class Reject:
    kind: str
    """The stats key: missing_value, invalid_messages, too_short, too_long."""
    detail: str

    @property
    def reason(self) -> str:
        return f"{self.kind}: {self.detail}"


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _message(number: int, item: Any) -> dict[str, str] | Reject:
    def invalid(detail: str) -> Reject:
        return Reject("invalid_messages", f"message {number}: {detail}")

    if not isinstance(item, dict):
        return invalid(f"expected an object, got {_json_type(item)}")
    if "role" in item:
        role, content, content_key = item["role"], item.get("content"), "content"
        if role not in CHAT_ROLES:
            return invalid(f"role {role!r} is not system/user/assistant")
    elif "from" in item:  # ShareGPT layout
        speaker, content, content_key = item["from"], item.get("value"), "value"
        if speaker not in SHAREGPT_ROLES:
            return invalid(f"from {speaker!r} is not human/gpt/system")
        role = SHAREGPT_ROLES[speaker]
    else:
        return invalid(f"needs the keys role and content (or ShareGPT's from and value), has {sorted(item)}")
    if not isinstance(content, str):
        return invalid(f"{content_key} must be a string, got {_json_type(content)}")
    return {"role": role, "content": content}


def parse_messages(value: Any, plain_role: str | None = None, needs_assistant: bool = True) -> list[dict[str, str]] | Reject:
    """One row's messages as [{"role", "content"}] (ShareGPT turns mapped), or why they are invalid.
    `plain_role`: text that is not a JSON list is one message of this role (preference data mixes
    both forms: TRL's conversational prompts, plain answers)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            if plain_role is not None:
                return [{"role": plain_role, "content": value}]
            return Reject("invalid_messages", f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})")
        if plain_role is not None and not isinstance(value, list):
            value = [{"role": plain_role, "content": value if isinstance(value, str) else json.dumps(value)}]
    if not isinstance(value, list):
        return Reject("invalid_messages", f"expected a JSON list of messages, got {_json_type(value)}")
    messages = []
    for number, item in enumerate(value, 1):
        message = _message(number, item)
        if isinstance(message, Reject):
            return message
        messages.append(message)
    if needs_assistant and not any(m["role"] == "assistant" for m in messages):
        return Reject("invalid_messages", f"no assistant message among {len(messages)}: nothing to learn")
    return messages


def normalize_messages(values: list[Any], normalize: Normalizer, plain_role: str | None = None,
                       needs_assistant: bool = True) -> list[list[dict[str, str]] | Reject | None]:
    """Parse a batch of messages columns and normalise every content in one vectorised call."""
    parsed = [None if v is None else parse_messages(v, plain_role, needs_assistant) for v in values]
    conversations = [p for p in parsed if isinstance(p, list)]
    contents = normalize([m["content"] for c in conversations for m in c]).to_pylist()
    position = 0
    for conversation in conversations:
        for message in conversation:
            message["content"] = contents[position]
            position += 1
    return parsed
