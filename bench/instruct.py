"""Instruction tuning on a real task: SmolLM2-135M-Instruct summarises standard-library functions.

    python bench/instruct.py [--steps 120] [--lr 1e-3] [--generate 80] [--seeds 0]

Task (dsee_scale/tasks.py): the user gives a function's source without its docstring, the
assistant answers with the docstring's summary line; split by module (4,504 train / 1,219
held-out records here). Data goes through the framework's own pipeline (format chat, the
model's chat template, loss on the assistant turn only, packed rows of 512 tokens that keep
samples apart), batch 2 rows, AdamW, constant lr, grad clip 1.0, the same batches for every
method. Methods at equal trainable parameters on q_proj, v_proj:
  base   no tuning
  lora   PEFT LoRA r=8, alpha=16                       (460,800 trainable)
  dsee   DSEE r=7, alpha=14, N=960 per matrix, GreBsmo  (460,800 trainable)
Scores: held-out answer-token loss / perplexity over --eval-rows packed rows; greedy answers
(max 48 new tokens, generation.generate_one, as `dsee-scale generate` runs them) to the first
--generate held-out prompts: exact match and chrF (sacrebleu), and per-sample chrF differences
between methods (paired) with a bootstrap 95% interval.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch

from common import peak_rss_mb, smollm2, tune, write_result

TARGETS = ["q_proj", "v_proj"]
BLOCK, BATCH = 512, 2


def data(tok, eval_rows: int):
    from dsee_scale.data import build_corpus
    from dsee_scale.experiment import DataConfig
    from dsee_scale.tasks import write_docstring_task

    d = Path.home() / ".cache" / "dsee_scale" / "docstring_task"
    counts = write_docstring_task(d)
    files = {"train_files": [str(d / "train.jsonl")], "eval_files": [str(d / "heldout.jsonl")]}
    cfg = DataConfig(format="chat", block_size=BLOCK, max_eval_blocks=eval_rows, **files)
    return cfg, build_corpus(cfg, tok), counts


def prepare(method: str, model, seed: int):
    from peft import LoraConfig, get_peft_model

    from dsee_scale.adapters import DSEEConfig, inject

    for p in model.parameters():
        p.requires_grad_(False)
    if method == "dsee":
        inject(
            model,
            DSEEConfig(r=7, alpha=14, num_sparse=960, support="grebsmo", target_modules=TARGETS, seed=seed),
        )
        return model
    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))


def train(model, corpus, steps: int, lr: float) -> dict:
    from dsee_scale.data import micro_batch

    batches = [micro_batch(corpus.train, s, 0, 0, 1, BATCH, BATCH, seed=0) for s in range(steps)]
    t = tune(model, batches, steps, lr, log_every=20)
    return {"train_losses": t["losses"], "step_seconds_median": statistics.median(t["step_seconds"])}


@torch.no_grad()
def answer_loss(model, blocks) -> float:
    """Mean loss per answer token over the held-out rows (as the trainer's evaluate)."""
    from dsee_scale.data import batch_tokens

    total = tokens = 0.0
    for i in range(0, len(blocks), 4):
        batch = blocks.rows(range(i, min(i + 4, len(blocks))))
        n = batch_tokens(batch)
        total += model(**batch, use_cache=False).loss.item() * n
        tokens += n
    return total / tokens


def answers(model, tok, samples) -> tuple[list[str], float]:
    from dsee_scale.data import chat_template_of
    from dsee_scale.generation import generate_one, input_ids

    template = chat_template_of(tok, None)
    out, new, seconds = [], 0, 0.0
    for s in samples:
        g = generate_one(model, tok, input_ids(tok, s, template), 48)
        out.append(g.text)
        new += g.new_tokens
        seconds += g.seconds
    return out, new / seconds


def sentence_chrf(preds: list[str], refs: list[str]) -> list[float]:
    import sacrebleu

    return [
        sacrebleu.sentence_chrf(" ".join(p.split()), [" ".join(r.split())]).score
        for p, r in zip(preds, refs, strict=True)
    ]


def paired(a: list[float], b: list[float], seed: int = 0, n: int = 2000) -> dict:
    """mean(a - b) with a bootstrap 95% interval over samples."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(d, k=len(d))) for _ in range(n))
    return {"mean": statistics.fmean(d), "ci95": [means[int(0.025 * n)], means[int(0.975 * n) - 1]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-rows", type=int, default=24)
    ap.add_argument("--generate", type=int, default=80)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--methods", default="base,lora,dsee")
    ap.add_argument("--name", default="instruct")
    args = ap.parse_args()
    from dsee_scale.generation import held_out_samples, task_metrics

    model, tok = smollm2()
    cfg, corpus, counts = data(tok, args.eval_rows)
    samples = held_out_samples(cfg, args.generate)
    refs = [s.reference for s in samples]
    print(corpus.describe(), flush=True)
    res: dict = {"records": counts, "corpus": corpus.describe(), "steps": args.steps, "lr": args.lr,
                 "batch_rows": BATCH, "block": BLOCK, "eval_answer_tokens": corpus.eval.answer_tokens(),
                 "generated_samples": len(samples), "runs": []}  # fmt: skip
    per_sample: dict[str, list[float]] = {}
    texts: dict[str, list[str]] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for method in args.methods.split(","):
            if method == "base" and seed != int(args.seeds.split(",")[0]):
                continue
            t0 = time.perf_counter()
            model, _ = smollm2()
            run: dict = {"method": method, "seed": seed}
            if method != "base":
                model = prepare(method, model, seed)
                run["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
                print(f"{method} seed {seed}: {run['trainable_parameters']:,} trainable", flush=True)
                run.update(train(model, corpus, args.steps, args.lr))
            run["answer_loss"] = answer_loss(model, corpus.eval)
            run["answer_perplexity"] = float(torch.tensor(run["answer_loss"]).exp())
            preds, tok_s = answers(model, tok, samples)
            run.update(
                task_metrics(preds, refs), generate_tokens_per_s=tok_s, seconds=time.perf_counter() - t0
            )
            key = f"{method}/{seed}"
            per_sample[key], texts[key] = sentence_chrf(preds, refs), preds
            run["answers"] = preds
            print({k: v for k, v in run.items() if k not in ("train_losses", "answers")}, flush=True)
            res["runs"].append(run)
    keys = list(per_sample)
    res["paired_chrf"] = {f"{a} - {b}": paired(per_sample[a], per_sample[b])
                          for i, a in enumerate(keys) for b in keys[i + 1 :]}  # fmt: skip
    res["examples"] = [{"prompt": s.prompt, "reference": s.reference, **{k: texts[k][i] for k in keys}}
                       for i, s in enumerate(samples[:6])]  # fmt: skip
    res["peak_rss_mb"] = peak_rss_mb()
    write_result(args.name, res)


if __name__ == "__main__":
    main()
