"""Records -> token ids and labels, one function per `data.format`.

- text: the document's tokens, every token a label (documents are later joined with EOS).
- prompt_completion: tokens of the prompt (with the tokenizer's special tokens, e.g. BOS), then
  the completion's tokens and EOS. Prompt and completion are tokenized apart, exactly as
  `dsee-scale generate` tokenizes a prompt, so training and generation see the same ids.
  Labels are -100 on the prompt.
- chat: the messages rendered with the chat template (the tokenizer's, or a Jinja file from
  `data.chat_template`), cut into segments at each assistant turn: the text before it up to the
  generation prompt, and the turn itself with its end-of-turn marker. Labels are -100 outside
  the assistant turns. The template must render incrementally (the first k messages' rendering
  is a prefix of the whole), which every common template does; otherwise the run stops.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from ..errors import ConfigError, UserError

IGNORE = -100  # the label transformers' loss skips


class ByteTokenizer:
    """UTF-8 bytes as token ids (0..255); EOS = 0. For random models without a tokenizer."""

    name_or_path = "bytes"
    eos_token_id = 0
    bos_token = None
    eos_token = "\x00"
    vocab_size = 256
    chat_template = None

    def __call__(self, text, add_special_tokens: bool = True):
        if isinstance(text, list):
            return {"input_ids": [list(t.encode("utf-8")) for t in text]}
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(int(i) for i in ids if not (skip_special_tokens and int(i) == 0)).decode(
            "utf-8", "replace"
        )


@lru_cache(maxsize=8)
def _compiled(template: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ConfigError(f"data.chat_template: not a valid Jinja template: {e}") from None


def chat_template_of(tokenizer: Any, template_file: str | None) -> str:
    """The template text: the YAML's file, else the tokenizer's own."""
    if template_file:
        from pathlib import Path

        p = Path(template_file).expanduser()
        if not p.is_file():
            raise ConfigError(f"data.chat_template: {template_file!r} does not exist (give a Jinja file)")
        return p.read_text(encoding="utf-8")
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not template:
        raise ConfigError(
            "data.chat_template: the tokenizer has no chat template; give a Jinja template file "
            "(for example the ChatML template in the README)"
        )
    return template


def render_chat(template: str, tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> str:
    from jinja2 import TemplateError

    try:
        return _compiled(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=getattr(tokenizer, "bos_token", None) or "",
            eos_token=getattr(tokenizer, "eos_token", None) or "",
        )
    except TemplateError as e:
        raise UserError(f"data.chat_template: rendering failed: {e}") from None


def chat_segments(
    template: str, tokenizer: Any, messages: list[dict], where: str = ""
) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_answer) segments, answers = assistant turns."""
    full = render_chat(template, tokenizer, messages, False)
    segments: list[tuple[str, bool]] = []
    pos = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_chat(template, tokenizer, messages[:i], True)
        upto = render_chat(template, tokenizer, messages[: i + 1], False)
        if not (upto.startswith(before) and full.startswith(upto) and len(before) >= pos):
            raise UserError(
                f"data: {where}: the chat template does not render the conversation incrementally "
                "(the first messages' rendering is not a prefix of the whole), so the assistant "
                "turns cannot be located; give data.chat_template a template that does"
            )
        segments += [(full[pos : len(before)], False), (full[len(before) : len(upto)], True)]
        pos = len(upto)
    segments.append((full[pos:], False))
    return [(t, a) for t, a in segments if t]


def _ids(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=special)["input_ids"] if texts else []


def tokenize_batch(batch: dict[str, list], tokenizer: Any, fmt: str, template: str | None) -> dict[str, list]:
    """A `datasets` batched-map function: records -> input_ids, labels (lists of lists)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    if fmt == "text":
        return {"input_ids": _ids(tokenizer, batch["text"], True)}  # labels = input_ids
    out: dict[str, list] = {"input_ids": [], "labels": []}
    if fmt == "prompt_completion":
        prompts = _ids(tokenizer, batch["prompt"], True)
        answers = _ids(tokenizer, batch["completion"], False)
        for p, c in zip(prompts, answers, strict=True):
            out["input_ids"].append(p + c + [eos])
            out["labels"].append([IGNORE] * len(p) + c + [eos])
        return out
    assert template is not None
    for messages, where in zip(batch["messages"], batch["where"], strict=True):
        segs = chat_segments(template, tokenizer, messages, where)
        seg_ids = _ids(tokenizer, [t for t, _ in segs], False)
        ids: list[int] = []
        labels: list[int] = []
        for (_, answer), s in zip(segs, seg_ids, strict=True):
            ids += s
            labels += s if answer else [IGNORE] * len(s)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
    return out


def prompt_ids(tokenizer: Any, prompt: str, template: str | None, messages: list[dict] | None = None) -> list[int]:
    """The ids a generation starts from, tokenized exactly as training tokenized prompts: the
    prompt with special tokens, or (with a chat template) the conversation so far (default: the
    prompt as one user turn) rendered up to the generation prompt."""
    if template is None:
        return _ids(tokenizer, [prompt], True)[0]
    text = render_chat(template, tokenizer, messages or [{"role": "user", "content": prompt}], True)
    return _ids(tokenizer, [text], False)[0]
