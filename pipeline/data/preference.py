"""Preference pairs (task `preference`, for DPO): a prompt with a chosen and a rejected answer.

Rows hold `prompt`, `chosen`, `rejected` (data.prompt_column, chosen_column, rejected_column), in
one of TRL's two forms:

    preference        plain text; the prompt_response template renders them: prompt_template
                      around the prompt, response_template around each answer, eos after it
    preference_chat   (preprocess.template chat) prompt: a JSON list of messages (or plain text, one
                      user message); chosen, rejected: a list holding one assistant message (or text)

Preprocess writes `prompt` (or `messages`, the prompt's canonical JSON), `chosen`, `rejected` and
`text` (all of it, for a scratch tokenizer and the length filter). Tokenize lays the pairs out
(data/preference_tokens.py).
"""

from __future__ import annotations

import json

from pipeline.config import PreprocessConfig
from pipeline.data.messages import Reject, normalize_messages
from pipeline.data.normalize import Normalizer

LAYOUTS = ("preference", "preference_chat")
OUTPUT_COLUMNS = {
    "preference": ("prompt", "chosen", "rejected", "text"),
    "preference_chat": ("messages", "chosen", "rejected", "text"),
}
ANSWERS = ("chosen", "rejected")


# ---------------------------------------------------------------- preprocess: one row


def chat_values(role: str, values: list, normalize: Normalizer) -> list:
    """preference_chat: parse a batch of one column into messages, contents normalised."""
    if role == "prompt":
        return normalize_messages(values, normalize, plain_role="user", needs_assistant=False)
    return normalize_messages(values, normalize, plain_role="assistant")


def _same_answers(chosen: str, rejected: str) -> Reject | None:
    if chosen == rejected:  # after normalisation: a pair that teaches nothing, and a zero margin forever
        return Reject("same_answers", "chosen and rejected are the same text: nothing to prefer")
    return None


def render(row: dict, cfg: PreprocessConfig) -> tuple[dict[str, str], str] | Reject:
    prompt = cfg.prompt_template.format_map({"prompt": row["prompt"]})
    chosen, rejected = (cfg.response_template.format_map({"response": row[a]}) for a in ANSWERS)
    out = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "text": f"{prompt}{chosen}\n{rejected}"}
    return _same_answers(chosen, rejected) or (out, min(row["chosen"], row["rejected"], key=len))


def render_chat(row: dict, cfg: PreprocessConfig) -> tuple[dict[str, str], str] | Reject:
    for key in ("prompt", *ANSWERS):
        if isinstance(row[key], Reject):
            return Reject(row[key].kind, f"{key}: {row[key].detail}")
    prompt = row["prompt"]
    if not prompt or prompt[-1]["role"] == "assistant":
        return Reject("invalid_messages", "prompt: must end with a user (or system) message, which the answers follow")
    answers = {}
    for key in ANSWERS:
        roles = [m["role"] for m in row[key]]
        if roles != ["assistant"]:
            return Reject("invalid_messages", f"{key}: expected one assistant message, got roles {roles}")
        answers[key] = row[key][0]["content"]
    text = "\n".join([*(m["content"] for m in prompt), answers["chosen"], answers["rejected"]])
    out = {"messages": json.dumps(prompt, ensure_ascii=False), **answers, "text": text}
    return _same_answers(answers["chosen"], answers["rejected"]) or (out, min(answers.values(), key=len))
