"""Generation and the task metric: `dsee-scale generate`, and what evaluation generates.

The model comes from export/loaded.py (an exported directory, or a training checkpoint merged
in memory) or, during training, is the engine's own partitioned model. Prompts are tokenized
exactly as training tokenized them (data.formats.prompt_ids): with the chat template for chat.

Task metric (held-out prompt/completion or chat samples): exact match after whitespace
normalisation, and chrF (sacrebleu's implementation, the character n-gram F-score used by WMT).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import UserError


@dataclass
class Sample:
    prompt: str  # the user text (chat: the last user message before the answer)
    reference: str
    messages: list[dict[str, str]] | None = None  # chat: the conversation before the answer


@dataclass
class Generated:
    text: str
    new_tokens: int
    seconds: float


def held_out_samples(data_cfg: Any, n: int) -> list[Sample]:
    """The first n held-out records of a prompt_completion / chat dataset, as prompts with
    their reference answers (a chat sample: everything before its last assistant turn)."""
    from .data.sources import expand_files, file_records

    if data_cfg.format == "text":
        raise UserError("eval.generate: a task metric needs data.format prompt_completion or chat")
    if not data_cfg.eval_files:
        raise UserError("eval.generate: needs data.eval_files (held-out records with answers)")
    out: list[Sample] = []
    for rec in file_records(expand_files(data_cfg.eval_files, "data.eval_files"), data_cfg):
        if len(out) == n:
            break
        if data_cfg.format == "prompt_completion":
            out.append(Sample(rec["prompt"], rec["completion"]))
        else:
            msgs = rec["messages"]
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            users = [m["content"] for m in msgs[:last] if m["role"] == "user"]
            out.append(Sample(users[-1] if users else "", msgs[last]["content"], msgs[:last]))
    return out


def input_ids(tokenizer: Any, sample: Sample, template: str | None) -> list[int]:
    from .data.formats import prompt_ids

    return prompt_ids(tokenizer, sample.prompt, template, sample.messages)


def stop_ids(tokenizer: Any, model: Any) -> list[int]:
    ids = {tokenizer.eos_token_id} | set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
    return sorted(i for i in ids if i is not None)


def _as_list(x: Any) -> list[int]:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


@torch.no_grad()
def generate_one(
    model: Any, tokenizer: Any, ids: list[int], max_new_tokens: int, *, temperature: float = 0.0,
    top_p: float = 1.0, synced: bool = False, device: Any = "cpu",
) -> Generated:  # fmt: skip
    """Greedy (temperature 0) or sampled continuation of `ids`; the answer text up to a stop id."""
    stops = stop_ids(tokenizer, model)
    t0 = time.perf_counter()
    x = torch.tensor([ids], dtype=torch.long, device=device)
    sample = temperature > 0
    out = model.generate(
        input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
        do_sample=sample, temperature=temperature if sample else None, top_p=top_p if sample else None,
        top_k=None, eos_token_id=stops or None, pad_token_id=stops[0] if stops else 0,
        synced_gpus=synced,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    new = out[0, len(ids) :].tolist()
    n = len(new)
    while new and new[-1] in stops:
        new.pop()
    return Generated(tokenizer.decode(new, skip_special_tokens=True), n, seconds)


def task_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """exact match (%) and chrF (0-100) of predictions against references."""
    import sacrebleu

    if not predictions:
        return {"exact_match": 0.0, "chrf": 0.0}

    def norm(s: str) -> str:
        return " ".join(s.split())

    em = sum(norm(p) == norm(r) for p, r in zip(predictions, references, strict=True)) / len(predictions)
    chrf = sacrebleu.corpus_chrf([norm(p) for p in predictions], [[norm(r) for r in references]]).score
    return {"exact_match": 100.0 * em, "chrf": float(chrf)}


def read_prompts(prompts: list[str], prompt_file: str | None) -> list[str]:
    """Prompts from the command line and/or a file (.jsonl with a "prompt" field, else one per line)."""
    out = list(prompts)
    if prompt_file:
        f = Path(prompt_file)
        if not f.is_file():
            raise UserError(f"--prompt-file: {prompt_file!r} does not exist")
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            if f.suffix == ".jsonl":
                try:
                    rec = json.loads(line)
                    out.append(rec["prompt"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(
                        f'--prompt-file: {f}:{i}: expected a JSON object with a "prompt" string'
                    ) from None
            else:
                out.append(line)
    if not out:
        raise UserError("generate: give at least one prompt (--prompt or --prompt-file)")
    return out
