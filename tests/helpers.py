"""Test helpers: tiny random models (no hub), configs, real launches, a plain reference."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]


def tiny_gpt2(seed: int = 0, **kw) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = dict(
        n_layer=2,
        n_embd=32,
        n_head=4,
        vocab_size=96,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    cfg.update(kw)
    return GPT2LMHeadModel(GPT2Config(**cfg)).eval()


def tiny_llama(seed: int = 0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def randomize_dsee(model, seed: int = 1, scale: float = 0.1):
    """Give B and S non-zero values so the update is visible (they start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".dsee." in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_tiny_model(root: Path, kind: str, **kw) -> Path:
    """A tiny random GPT-2 / LLaMA with a 256-id vocabulary (byte tokens), saved to a dir, so
    every process of a test (and the plain reference) starts from the same weights."""
    d = root / "-".join([f"{kind}-model", *(f"{k}{v}" for k, v in kw.items())])
    build = tiny_gpt2 if kind == "gpt2" else tiny_llama
    build(vocab_size=256, **({"n_positions": 64} if kind == "gpt2" else {}), **kw).save_pretrained(d)
    return d


def write_config(path: Path, model_dir: Path, output_dir: Path, cache_dir: Path, **sections) -> Path:
    cfg = {
        "model": {"path": str(model_dir)},
        "dsee": {"r": 4, "alpha": 8, "num_sparse": 16, "support": "grebsmo", "grebsmo_rounds": 3},
        "data": {
            "source": "python_stdlib",
            "block_size": 32,
            "max_train_blocks": 256,
            "max_eval_blocks": 16,
            "cache_dir": str(cache_dir),
        },
        "train": {
            "max_steps": 6,
            "batch_size": 4,
            "micro_batch_size": 2,
            "lr": 5e-3,
            "warmup_steps": 1,
            "schedule": "linear",
            "histogram_every": 3,
        },
        "eval": {"every": 3, "batch_size": 4},
        "checkpoint": {"every": 3, "keep_last": 3},
        "deepspeed": str(ROOT / "ds_configs" / "zero3.json"),
        "output_dir": str(output_dir),
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(
    config: Path, nproc: int = 1, *extra: str, timeout: int = 600, config_path: Path | None = None
) -> subprocess.CompletedProcess:
    """nproc == 1: plain `python <script>`; else the real deepspeed launcher. `config` is the
    experiment YAML for launchers/train.py; for another launcher pass the script as `config`
    and the YAML as `config_path`."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    script = str(ROOT / "launchers" / "train.py")
    if str(config).endswith(".py"):
        script, config = str(config), config_path
    if nproc == 1:
        cmd = [sys.executable, script, "--config", str(config), *extra]
    else:
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            str(nproc),
            "--master_port",
            str(free_port()),
            script,
            "--config",
            str(config),
            *extra,
        ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return r


def check(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def losses(output_dir: Path) -> dict[int, float]:
    out = {}
    for line in (output_dir / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def deepspeed_params(ckpt_dir: Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Every parameter of a checkpoint, consolidated by DeepSpeed's own zero_to_fp32 (the
    independent reference for our reader, export and training)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def rebuilt(ckpt_dir: Path, model_path: Path | None = None):
    """The trained DSEE model of a checkpoint, rebuilt with plain transformers from DeepSpeed's
    own consolidation (the reference for export and pruning): the base from model_path, or from
    the checkpoint's model config (random-config and pruned models)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from dsee_scale.adapters import DSEEConfig, inject
    from dsee_scale.checkpoint import ZeroCheckpoint
    from dsee_scale.models import ModelConfig, load_config

    ck = ZeroCheckpoint(ckpt_dir)
    exp = ck.experiment()
    if model_path is not None:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(load_config(ModelConfig(config=exp["model"]["config"])))
    inject(model, DSEEConfig(**exp["dsee"]), load_file(str(ck.dir / "dsee_supports.safetensors")))
    state = deepspeed_params(ck.dir.parent, tag=ck.tag)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


def plain_reference(config: Path) -> tuple[dict[int, float], dict, dict[str, torch.Tensor]]:
    """The same DSEE run in plain PyTorch (no DeepSpeed): the losses, the supports, and the
    trained A, B and S values."""
    from transformers import AutoModelForCausalLM, get_scheduler

    from dsee_scale.adapters import adapter_state_dict, inject, supports_of
    from dsee_scale.data import ByteTokenizer, build_corpus, micro_batch
    from dsee_scale.experiment import load_experiment

    exp = load_experiment(str(config))
    t = exp.train
    torch.manual_seed(t.seed)
    model = AutoModelForCausalLM.from_pretrained(exp.model.path, dtype=torch.float32)
    inject(model, exp.dsee)
    corpus = build_corpus(exp.data, ByteTokenizer())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=t.weight_decay)
    sched = get_scheduler(t.schedule, opt, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps)
    accum = t.batch_size // t.micro_batch_size
    model.train()
    out = {}
    for step in range(t.max_steps):
        total = 0.0
        for micro in range(accum):
            ids = micro_batch(corpus.train, step, micro, 0, 1, t.micro_batch_size, t.batch_size, t.seed)
            loss = model(input_ids=ids, labels=ids).loss
            (loss / accum).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        out[step + 1] = total / accum
    trained = {k: v.detach().clone() for k, v in adapter_state_dict(model).items() if "sparse_index" not in k}
    return out, {k: v.clone() for k, v in supports_of(model).items()}, trained
