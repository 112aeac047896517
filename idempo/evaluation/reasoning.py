"""Judges that reason before they answer (Qwen3 and other `<think>` models).

Thinking is turned off where the template allows (`enable_thinking=False`); a template that still ends
inside an open block gets the reasoning written greedily up to `max_reasoning_tokens`, and the number is
read after the closing tag. Unclosed reasoning is a refusal, never a 0 (docs/metrics.md, "Thinking judges").
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"
# Tokens of whitespace read after the closing tag before the number ("</think>\n\n85").
WHITESPACE_AFTER_CLOSE = 8
TEMPLATE_SETTINGS = {"enable_thinking": False}


# A judge prompt whose rendering shows what the template adds after the user's message.
PROBE = "Answer with a single number between 0 and 100."


def leaves_reasoning_open(rendered: str, content: str = PROBE) -> bool:
    """Whether a chat template's generation prompt ends inside a reasoning block (opened and not
    closed), from a rendering of a message with this `content`. Only what follows the message counts:
    a rubric or a judged answer may itself mention the tags."""
    at = rendered.rfind(content)
    tail = rendered[at + len(content) :] if at >= 0 else rendered
    opened = tail.rfind(OPEN)
    return opened >= 0 and tail.rfind(CLOSE) < opened


def closes_reasoning(text: str) -> bool:
    return CLOSE in text


def is_whitespace(text: str) -> bool:
    """A token that separates the closing tag from the number (an empty text, such as a special
    token's, is not)."""
    return bool(text) and text.isspace()
