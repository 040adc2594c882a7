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


SHM_BUFFERS = "deepspeed_allreduce_buffer_*"  # DeepSpeed's CPU all-reduce: ..._{uid}_{addr}_{port}_{rank}


def shm_buffers() -> set[Path]:
    return set(Path("/dev/shm").glob(SHM_BUFFERS))


def leaked_shm_buffers(before: set[Path]) -> set[Path]:
    """DeepSpeed shared-memory buffers made since `before` that no live run owns. Tests run two at
    a time (pytest-xdist), so another test's run may hold one for the seconds between making it and
    dsee_scale.zero.comm unlinking it; while a run lives, its rank 0 listens on the port in the
    name. A finished run's port has no listener, so its leftover buffer is reported."""
    leaked = set()
    for path in shm_buffers() - before:
        port = int(path.name.split("_")[-2])
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT socket is no owner
            try:
                s.bind(("", port))
            except OSError:  # a live run listens there
                continue
        leaked.add(path)
    return leaked


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


LAUNCH_ENV = {"DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def launch_command(script: Path, config: Path, nproc: int, *extra: str) -> list[str]:
    """nproc == 1: plain `python <script>`; else the real deepspeed launcher on a free port."""
    if nproc == 1:
        return [sys.executable, str(script), "--config", str(config), *extra]
    runner = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc)]
    return [*runner, "--master_port", str(free_port()), str(script), "--config", str(config), *extra]


def launch(
    config: Path, nproc: int = 1, *extra: str, timeout: int = 600, config_path: Path | None = None
) -> subprocess.CompletedProcess:
    """Run a launcher to the end. `config` is the experiment YAML for launchers/train.py; for
    another launcher pass the script as `config` and the YAML as `config_path`."""
    script = ROOT / "launchers" / "train.py"
    if str(config).endswith(".py"):
        script, config = Path(config), config_path  # type: ignore[assignment]
    cmd = launch_command(script, config, nproc, *extra)
    env = dict(os.environ, **LAUNCH_ENV)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def launch_many(runs: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """`dsee-scale <argv>` (as `python launchers/train.py ...` is `dsee-scale train ...`) for each
    argv, as forked children of one interpreter that imported everything once
    (tests/forked_cli.py): the same main, error wrapper and exit codes, without paying the
    imports per run. For runs that stop early (bad input)."""
    cases = [{"argv": argv, "env": {"MASTER_PORT": str(free_port())}} for argv in runs]
    env = dict(os.environ, **LAUNCH_ENV)
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "forked_cli.py")], cwd=ROOT, env=env,
                       input=json.dumps(cases), capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return [subprocess.CompletedProcess(c["argv"], x["returncode"], x["stdout"], x["stderr"])
            for c, x in zip(cases, json.loads(r.stdout), strict=True)]  # fmt: skip


def check(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def losses(output_dir: Path) -> dict[int, float]:
    out = {}
    for line in (output_dir / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


# the references live in the package, so the device check can use them too
from dsee_scale.reference import deepspeed_params, plain_reference, rebuilt  # noqa: E402,F401


def save_model_with_tokenizer(root: Path, vocab_size: int = 640, **kw) -> Path:
    """A tiny random LLaMA with a real SentencePiece tokenizer (trained here on a few standard
    library files): what a GGUF export needs, since the format carries the tokenizer."""
    import sysconfig

    import sentencepiece as spm
    from transformers import AutoTokenizer

    d = root / "llama-sp"
    d.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = root / "sp-corpus.txt"
    corpus.write_text("\n".join(p.read_text(errors="ignore") for p in sorted(stdlib.glob("*.py"))[:30]))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(d / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=0.995, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        minloglevel=2,
    )  # fmt: skip
    (d / "tokenizer.vocab").unlink()
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
    }))  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(d)
    tiny_llama(
        vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=None, **kw
    ).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


# Loads an export in a process where dsee_scale cannot be imported (as a colleague or a serving
# stack without our package would), with trust_remote_code, and saves the logits of some ids.
_FOREIGN_LOAD = """
import sys
sys.modules["dsee_scale"] = None  # any `import dsee_scale` now fails
import torch
from transformers import AutoModelForCausalLM
model_dir, ids_file, out_file = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
with torch.no_grad():
    torch.save({"logits": model(torch.load(ids_file)).logits, "class": type(model).__name__}, out_file)
"""


def logits_without_dsee_scale(model_dir: Path, ids: torch.Tensor, work: Path) -> tuple[torch.Tensor, str]:
    """(logits, model class name) of an export loaded with only transformers installed."""
    work.mkdir(parents=True, exist_ok=True)
    torch.save(ids, work / "ids.pt")
    env = dict(os.environ, HF_MODULES_CACHE=str(work / "hf_modules"))
    cmd = [sys.executable, "-c", _FOREIGN_LOAD, str(model_dir), str(work / "ids.pt"), str(work / "out.pt")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    out = torch.load(work / "out.pt")
    return out["logits"], out["class"]


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def save_chat_model(root: Path, vocab_size: int = 400) -> Path:
    """A tiny random LLaMA with a real byte-level BPE tokenizer (trained here on standard
    library files, as GPT-2's and SmolLM2's are built) that has ChatML special tokens and a
    chat template: what instruction-tuning tests need."""
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    d = root / "llama-chat"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="ignore") for p in sorted(stdlib.glob("*.py"))[:20]]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    ))  # fmt: skip
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    tiny_llama(vocab_size=len(tok), bos_token_id=None, eos_token_id=eos, pad_token_id=0,
               max_position_embeddings=128).save_pretrained(d)  # fmt: skip
    tok.save_pretrained(d)
    return d
