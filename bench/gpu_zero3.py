"""DSEE vs PEFT LoRA under DeepSpeed ZeRO-3 on one GPU: tokens/s and peak GPU memory, bf16.

    python bench/gpu_zero3.py [--steps 20] [--batch 8] [--seq 512]      (needs a CUDA GPU)
    python bench/gpu_zero3.py --device cpu --tiny --steps 2              (the same code path on
                                                                          CPU, for the tests)
Models: a GPT-2 medium-sized model (355M, random weights: speed and memory do not depend on the
values) and SmolLM2-135M (the GGUF when it can be fetched; otherwise its architecture with random
weights, and the result says which). Each model is tuned with DSEE r=8 N=64 and with PEFT LoRA
r=8 on the SAME matrices (SmolLM2: q_proj and v_proj; GPT-2: the whole fused c_attn, since PEFT
cannot target a slice of it, so DSEE takes all of it too): the same batch, engine config
(ZeRO-3, bf16, AdamW) and process; each engine is built, warmed up (2 steps), timed and torn down
in turn, with the peak memory counter reset in between. SVD supports (cheap to choose).
Results: bench/results/gpu_zero3_<card>.json.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from common import peak_rss_mb, write_result

ROOT = Path(__file__).resolve().parents[1]

SMOLLM2 = dict(
    model_type="llama",
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
)
GPT2_MEDIUM = dict(model_type="gpt2", n_layer=24, n_embd=1024, n_head=16, n_positions=1024, vocab_size=50257)
TINY = {
    "gpt2-medium": dict(GPT2_MEDIUM, n_layer=2, n_embd=64, n_head=4),
    "smollm2-135m": dict(SMOLLM2, hidden_size=72, intermediate_size=96, num_hidden_layers=2),
}
TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}  # what LoRA targets too
LORA_TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}


def ds_config(batch: int) -> dict:
    return {
        "train_batch_size": batch,
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0}},
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3},
        "steps_per_print": 10**9,
    }


def build(name: str, tiny: bool):
    """(model in bf16, description)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if name == "smollm2-135m" and not tiny:
        try:
            from dsee_scale.assets import smollm2_gguf
            from dsee_scale.models import ModelConfig, load_model

            return (
                load_model(ModelConfig(gguf_file=str(smollm2_gguf()), dtype="bfloat16")),
                "SmolLM2-135M-Instruct (GGUF)",
            )
        except Exception as e:  # no network / no package on the GPU machine
            print(
                f"SmolLM2 GGUF not available ({type(e).__name__}); using its architecture "
                "with random weights",
                flush=True,
            )
    kw = dict((TINY if tiny else {"gpt2-medium": GPT2_MEDIUM, "smollm2-135m": SMOLLM2})[name])
    mt = kw.pop("model_type")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(mt, **kw), dtype=torch.bfloat16)
    return model, f"{name} architecture, random weights" + (" (tiny)" if tiny else "")


def adapt(model, method: str):
    from peft import LoraConfig, get_peft_model

    from dsee_scale.adapters import DSEEConfig, inject

    mt = model.config.model_type
    for p in model.parameters():
        p.requires_grad_(False)
    if method == "dsee":
        inject(model, DSEEConfig(r=8, alpha=16, num_sparse=64, support="svd", target_modules=TARGETS[mt]))
        return model
    return get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS[mt])
    )


def measure(name: str, method: str, args) -> dict:
    device = args.device
    import deepspeed

    model, desc = build(name, args.tiny)
    model = adapt(model, method)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    engine, *_ = deepspeed.initialize(
        model=model,
        config=ds_config(args.batch),
        model_parameters=[p for p in model.parameters() if p.requires_grad],
    )
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(engine.device)
    times = []
    for i in range(args.steps + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # warm-up excluded
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    row = {
        "model": desc,
        "method": method,
        "trainable_parameters": trainable,
        "step_seconds_median": step,
        "tokens_per_s": args.batch * args.seq / step,
        "final_loss": float(loss.float().item()),
        "peak_gpu_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
    }
    print(
        f"{name} {method}: {row['tokens_per_s']:.0f} tokens/s, peak GPU memory "
        f"{row['peak_gpu_memory_mb']} MB",
        flush=True,
    )
    engine.destroy()
    del engine, model
    gc.collect()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="2-layer models (tests)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "error: --device cuda: no CUDA GPU is visible (torch "
            f"{torch.__version__}); run this on a GPU machine with a CUDA build of torch, "
            "or use --device cpu --tiny for a smoke run",
            file=sys.stderr,
        )
        sys.exit(2)
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for k, v in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": os.environ.get("MASTER_PORT", "29613"),
    }.items():
        os.environ.setdefault(k, v)
    import deepspeed

    deepspeed.init_distributed(verbose=False)
    rows = {}
    for name in ("gpt2-medium", "smollm2-135m"):
        for method in ("dsee", "lora"):
            rows[f"{name}/{method}"] = measure(name, method, args)
    ratios = {
        name: {
            "tokens_per_s_dsee_over_lora": rows[f"{name}/dsee"]["tokens_per_s"]
            / rows[f"{name}/lora"]["tokens_per_s"],
            "step_time_dsee_over_lora": rows[f"{name}/dsee"]["step_seconds_median"]
            / rows[f"{name}/lora"]["step_seconds_median"],
        }
        for name in ("gpt2-medium", "smollm2-135m")
    }
    card = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "_", card.lower()).strip("_") + ("_tiny" if args.tiny else "")
    write_result(
        f"gpu_zero3_{slug}",
        {
            "device": card,
            "cuda": torch.version.cuda,
            "batch": [args.batch, args.seq],
            "dtype": "bfloat16",
            "zero_stage": 3,
            "timed_steps": args.steps,
            "rows": rows,
            "ratios": ratios,
            "process_peak_rss_mb": peak_rss_mb(),
        },
    )
    for name, r in ratios.items():
        print(f"{name}: DSEE/LoRA step time {r['step_time_dsee_over_lora']:.3f}")


if __name__ == "__main__":
    main()
