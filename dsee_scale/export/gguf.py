"""A merged export -> GGUF files for llama.cpp, by llama.cpp's own converter.

`dsee-scale export CKPT OUT --format gguf --gguf-type f16,q8_0` first writes the merged
Hugging Face export (a temporary directory), then runs llama.cpp's maintained
`convert_hf_to_gguf.py` on it (fetched once from the llama-cpp-python source package, see
assets.llama_cpp_converter), once per type. The converter reads the config's `architectures`
(every export names it) and the tokenizer files, and writes the tokenizer into the GGUF.

LLaMA-family models only (llama.cpp's `llama` architecture carries the head size separately,
so structured-pruned shapes convert too, our dsee_llama ones included; transformers' own GGUF
loader cannot open those last ones, since its LlamaConfig refuses their head count). A model
without a tokenizer (a random model trained on byte tokens) cannot be converted: the GGUF
format needs one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from ..archs import LLAMA
from ..errors import UserError

GGUF_TYPES = ("f16", "q8_0", "bf16", "f32")  # what --gguf-type takes (the converter's outtypes)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def parse_types(text: str) -> list[str]:
    types = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in types if t not in GGUF_TYPES]
    if not types or bad:
        raise UserError(
            f"--gguf-type: got {text!r}, allowed: a comma-separated list of {', '.join(GGUF_TYPES)}"
        )
    return types


def check_convertible(hf_dir: Path) -> dict:
    """The export's config, when llama.cpp's converter can take it; else a one-line error."""
    config = json.loads((hf_dir / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in LLAMA.model_types:
        raise UserError(f"--format gguf: LLaMA-family models only (this one is {model_type!r}); "
                        "use the safetensors export")  # fmt: skip
    if not any((hf_dir / f).is_file() for f in TOKENIZER_FILES):
        raise UserError("--format gguf: the model has no tokenizer (it was trained on byte tokens), and "
                        "a GGUF file carries one; give model.tokenizer, or export safetensors")  # fmt: skip
    return config


def as_llama(hf_dir: Path, config: dict, work: Path) -> Path:
    """A view of the export whose `architectures` llama.cpp's converter knows: our dsee_llama
    (a head count that does not divide the hidden size) is a plain LLaMA with an explicit head
    size to llama.cpp. The model type stays dsee_llama, so that transformers (which the
    converter asks for the config and tokenizer) reads it with our registered config class."""
    if config["model_type"] == "llama":
        return hf_dir
    view = work / "as-llama"
    view.mkdir()
    for f in hf_dir.iterdir():
        if f.is_file() and f.name != "config.json":
            (view / f.name).symlink_to(f.resolve())
    plain = {k: v for k, v in config.items() if k != "auto_map"}
    plain["architectures"] = [LLAMA.lm_class]
    (view / "config.json").write_text(json.dumps(plain, indent=2))
    return view


# Runs the converter script as __main__ with dsee_scale imported first (its pruned config
# classes registered with transformers), from the script's own directory, whose `conversion`
# package it imports.
RUN_CONVERTER = (
    "import dsee_scale, runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def convert(hf_dir: Path, out_dir: Path, types: list[str], work: Path) -> list[str]:
    """Write out_dir/model-<type>.gguf for each type; returns the file names."""
    from ..assets import llama_cpp_converter

    source = as_llama(hf_dir, check_convertible(hf_dir), work)
    script = llama_cpp_converter()
    names = []
    for gguf_type in types:
        name = f"model-{gguf_type}.gguf"
        cmd = [sys.executable, "-c", RUN_CONVERTER, str(script), str(source.resolve())]
        cmd += ["--outfile", str((out_dir / name).resolve()), "--outtype", gguf_type]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=script.parent)
        if r.returncode != 0:
            last = (r.stderr.strip() or r.stdout.strip() or str(r.returncode)).splitlines()[-1]
            raise UserError(f"--format gguf: llama.cpp's converter refused the export ({gguf_type}): {last}")
        names.append(name)
    shutil.rmtree(work / "as-llama", ignore_errors=True)
    return names
