"""Turn one JSONL record into token ids and labels; labels are -100 wherever the loss must not look.

Formats (``auto`` picks by the keys of each record):
  alpaca: ``instruction``, optional ``input``, ``output``; loss on ``output`` only. Rendered with the
          tokenizer's chat template (user = instruction + input) when it has one, else a plain
          ``### Instruction / ### Response`` template.
  chat:   ``messages`` = [{role, content}, ...] rendered with the chat template; loss on every assistant turn.
  text:   ``text``; loss on every token (continued pre-training).
"""

from __future__ import annotations

from typing import Literal

from transformers import PreTrainedTokenizerBase

from heavylift.config.errors import HeavyliftError

Format = Literal["auto", "alpaca", "chat", "text"]
Sample = tuple[list[int], list[int]]  # (input_ids, labels)
IGNORE = -100
_ROLES = ("system", "user", "assistant", "tool")


def detect_format(record: dict, where: str) -> str:
    if "messages" in record:
        return "chat"
    if "instruction" in record or "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    raise HeavyliftError(f"{where}: cannot tell the format: expected 'instruction'+'output' (alpaca), "
                         f"'messages' (chat) or 'text'; found keys {sorted(record)}")


def encode(record: dict, fmt: str, tokenizer: PreTrainedTokenizerBase, where: str) -> Sample:
    fmt = detect_format(record, where) if fmt == "auto" else fmt
    if fmt == "text":
        text = _field(record, "text", where)
        ids = _tokens(tokenizer, text) + _eos(tokenizer)
        return ids, list(ids)
    if fmt == "alpaca":
        instruction, output = _field(record, "instruction", where), _field(record, "output", where)
        extra = record.get("input", "") or ""
        if not isinstance(extra, str):
            raise HeavyliftError(f"{where}: field 'input' must be a string")
        if tokenizer.chat_template:
            user = f"{instruction}\n\n{extra}" if extra else instruction
            return _chat(tokenizer, [{"role": "user", "content": user},
                                     {"role": "assistant", "content": output}], where)
        prompt = (f"### Instruction:\n{instruction}\n\n" + (f"### Input:\n{extra}\n\n" if extra else "")
                  + "### Response:\n")
        return _join(tokenizer, [(prompt, False), (output, True)], eos_trained=True)
    if fmt == "chat":
        return _chat(tokenizer, _messages(record, where), where)
    raise HeavyliftError(f"{where}: unknown data format {fmt!r}: use auto, alpaca, chat or text")


def _chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict], where: str) -> Sample:
    """Render turn by turn; each assistant turn is the text its own rendering adds to the prompt before it."""
    if not tokenizer.chat_template:
        raise HeavyliftError(f"{where}: chat data needs a tokenizer with a chat template, and this one has none")
    if not any(m["role"] == "assistant" for m in messages):
        raise HeavyliftError(f"{where}: no assistant message, so nothing to train on")
    pieces, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation_prompt=True)
        full = _render(tokenizer, messages[:i + 1], generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise HeavyliftError(f"{where}: the tokenizer's chat template does not render turns as prefixes of "
                                 "each other, so the assistant tokens cannot be found")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    rest = _render(tokenizer, messages, generation_prompt=False)
    pieces.append((rest[len(done):] if rest.startswith(done) else "", False))
    return _join(tokenizer, pieces, eos_trained=False)


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _join(tokenizer: PreTrainedTokenizerBase, pieces: list[tuple[str, bool]], eos_trained: bool) -> Sample:
    ids, labels = [], []
    for text, trained in pieces:
        piece = _tokens(tokenizer, text) if text else []
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    if eos_trained:
        ids += _eos(tokenizer)
        labels += _eos(tokenizer)
    return ids, labels


def _messages(record: dict, where: str) -> list[dict]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HeavyliftError(f"{where}: field 'messages' must be a non-empty list")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in _ROLES:
            raise HeavyliftError(f"{where}: messages[{j}] must be {{'role': one of {', '.join(_ROLES)}, "
                                 "'content': a string}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _field(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise HeavyliftError(f"{where}: missing field {key!r}")
    if not isinstance(record[key], str):
        raise HeavyliftError(f"{where}: field {key!r} must be a string")
    return record[key]


def _tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _eos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
