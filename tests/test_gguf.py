"""GGUF exports (llama.cpp's own converter) against the safetensors export they come from, read
back with transformers' GGUF loader."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dsee_scale.errors import UserError
from dsee_scale.export import export_checkpoint

from helpers import (
    ROOT,
    check,
    launch,
    logits_without_dsee_scale,
    losses,
    rebuilt,
    save_model_with_tokenizer,
    write_config,
)


def tune_and_prune(root, name, **model_kw):
    model = save_model_with_tokenizer(root / name, initializer_range=0.1, **model_kw)
    cfg = write_config(root / f"{name}.yaml", model, root / name / "tuned", root / "cache",
                       train={"max_steps": 2}, checkpoint={"every": 2})  # fmt: skip
    check(launch(cfg, 1))
    check(launch(ROOT / "launchers" / "prune.py", 1, "--from", str(root / name / "tuned" / "checkpoints"),
                 f"output_dir={root / name / 'pruned'}", "prune.heads_per_layer=1",
                 "prune.channels_per_layer=16", "train.max_steps=1", config_path=cfg))  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny LLaMAs with a SentencePiece tokenizer, tuned 2 steps, then structured-pruned by one
    q head per kv group: GQA 4/2 -> 2 heads of 8 in a hidden size of 32 (head_dim explicit, a
    standard LlamaConfig); MHA 4/4 -> 3 heads, which transformers' LlamaConfig refuses (our
    dsee_llama type)."""
    root = tmp_path_factory.mktemp("gguf")
    tune_and_prune(root, "gqa")
    tune_and_prune(root, "mha", num_key_value_heads=4)
    return root


def fp16_rounded(model):
    """What an f16 GGUF holds: the matrices in fp16 (llama.cpp keeps the norms in fp32)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
    return model


@pytest.mark.parametrize("run", ["tuned", "pruned"])
def test_gguf_files_load_in_transformers_with_the_exports_logits(runs, run, tmp_path):
    ckpt = runs / "gqa" / run / "checkpoints"
    hf, gg = tmp_path / "hf", tmp_path / "gguf"
    export_checkpoint(str(ckpt), str(hf))
    summary = export_checkpoint(str(ckpt), str(gg), fmt="gguf", gguf_types="f16,q8_0")
    assert summary["gguf_files"] == ["model-f16.gguf", "model-q8_0.gguf"] and summary["format"] == "gguf"
    assert sorted(p.name for p in gg.iterdir()) == ["dsee_export.json", "model-f16.gguf", "model-q8_0.gguf"]
    reference = AutoModelForCausalLM.from_pretrained(hf).eval()
    ids = torch.randint(3, reference.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = reference(ids).logits
        rounded = fp16_rounded(reference)(ids).logits
        f16 = AutoModelForCausalLM.from_pretrained(gg, gguf_file="model-f16.gguf").eval()
        q8 = AutoModelForCausalLM.from_pretrained(gg, gguf_file="model-q8_0.gguf").eval()
        torch.testing.assert_close(f16(ids).logits, rounded, rtol=1e-5, atol=1e-5)  # f16: fp16 rounding only
        assert (q8(ids).logits - exact).norm() / exact.norm() < 0.05  # 8-bit blocks: close, not equal
    assert f16.config.num_attention_heads == reference.config.num_attention_heads
    if run == "pruned":
        assert reference.config.num_attention_heads == 2 and reference.config.head_dim == 8
    # the tokenizer travels inside the file (llama.cpp's GGUF adds BOS in front)
    text = "def f(x):\n    return x"
    want = AutoTokenizer.from_pretrained(hf)(text)["input_ids"]
    got = AutoTokenizer.from_pretrained(gg, gguf_file="model-f16.gguf")(text)["input_ids"]
    assert got[1:] == want and got[0] == 1


def test_two_ranks_train_from_a_gguf_dequantized_once_per_node(runs, tmp_path, monkeypatch):
    """model.gguf_file on two ranks: the node's local rank 0 dequantizes the GGUF once into a
    safetensors directory that both ranks load (partitioned); the run's losses are the losses
    of a one-rank run that loads the GGUF directly."""
    monkeypatch.setenv("DSEE_SCALE_CACHE", str(tmp_path / "cache-root"))
    gg = tmp_path / "gguf"
    export_checkpoint(str(runs / "gqa" / "tuned" / "checkpoints"), str(gg), fmt="gguf", gguf_types="f16")
    got = {}
    for n in (1, 2):
        cfg = write_config(tmp_path / f"g{n}.yaml", gg, tmp_path / f"run{n}", tmp_path / "cache",
                           train={"max_steps": 2}, checkpoint={"every": 2})  # fmt: skip
        check(launch(cfg, n, "model.path=null", f"model.gguf_file={gg / 'model-f16.gguf'}"))
        got[n] = losses(tmp_path / f"run{n}")
    assert sorted(got[2]) == [1, 2]
    for s in (1, 2):
        assert got[2][s] == pytest.approx(got[1][s], rel=1e-4, abs=1e-4), (s, got)
    made = list((tmp_path / "cache-root" / "models").iterdir())
    assert len(made) == 1 and (made[0] / "config.json").is_file(), made  # one rank wrote it, once


def test_what_gguf_cannot_take_is_a_one_line_error(runs, tmp_path):
    ckpt = str(runs / "gqa" / "tuned" / "checkpoints")
    with pytest.raises(UserError, match="--gguf-type: got 'q4'"):
        export_checkpoint(ckpt, str(tmp_path / "a"), fmt="gguf", gguf_types="q4")
    with pytest.raises(UserError, match="only a merged model"):
        export_checkpoint(ckpt, str(tmp_path / "b"), mode="adapter", fmt="gguf")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_model_without_tokenizer_or_not_llama_is_refused(tmp_path):
    from dsee_scale.export.gguf import check_convertible

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError, match="LLaMA-family models only"):
        check_convertible(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="no tokenizer"):
        check_convertible(tmp_path)


def test_a_pruned_shape_transformers_refuses_travels_with_its_code_and_converts_to_gguf(runs, tmp_path):
    """dsee_llama (3 heads of 8 in 32): the export carries modeling_dsee.py and an auto_map, so
    transformers alone loads it (trust_remote_code) with the framework's logits; llama.cpp's
    llama architecture takes it with an explicit head size."""
    import gguf

    ckpt = runs / "mha" / "pruned" / "checkpoints"
    hf = tmp_path / "hf"
    summary = export_checkpoint(str(ckpt), str(hf))
    config = json.loads((hf / "config.json").read_text())
    assert config["model_type"] == "dsee_llama" and config["architectures"] == ["DSEELlamaForCausalLM"]
    assert summary["self_contained"] and (hf / "modeling_dsee.py").is_file()
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_dsee.DSEELlamaForCausalLM"
    ids = torch.randint(3, config["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(3))
    logits, model_class = logits_without_dsee_scale(hf, ids, tmp_path / "foreign")
    with torch.no_grad():
        torch.testing.assert_close(logits, rebuilt(ckpt)(ids).logits, rtol=1e-4, atol=1e-4)
    assert model_class == "DSEELlamaForCausalLM"

    export_checkpoint(str(ckpt), str(tmp_path / "gguf"), fmt="gguf", gguf_types="f16")
    reader = gguf.GGUFReader(str(tmp_path / "gguf" / "model-f16.gguf"))

    def field(key):
        f = reader.fields[key]
        return f.parts[f.data[0]].tolist()[0]

    assert (field("llama.attention.head_count"), field("llama.attention.key_length")) == (3, 8)
    assert field("llama.embedding_length") == 32 and field("llama.block_count") == 2


def test_remote_code_imports_nothing_of_dsee_scale():
    import ast

    from dsee_scale.pruning import pruned_models

    tree = ast.parse(open(pruned_models.__file__).read())
    roots = {(a.name if isinstance(n, ast.Import) else n.module or "").split(".")[0]
             for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)
             for a in n.names}  # fmt: skip
    assert roots <= {"__future__", "copy", "torch", "transformers", "huggingface_hub"}, roots
