"""Export of ZeRO-3 checkpoints: against DeepSpeed's consolidation and plain transformers."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dsee_scale.adapters import load_adapter
from dsee_scale.checkpoint import ZeroCheckpoint
from dsee_scale.export import export_checkpoint

from helpers import ROOT, check, deepspeed_params, launch, rebuilt, save_tiny_model, tiny_llama, write_config

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    out = {}
    for kind in ("gpt2", "llama"):
        model_dir = out[f"{kind}-model"] = save_tiny_model(root, kind)
        for n in (1, 2) if kind == "gpt2" else (2,):
            cfg = write_config(
                root / f"{kind}-{n}.yaml",
                model_dir,
                root / f"{kind}-{n}",
                root / "cache",
                train={"max_steps": 3},
                checkpoint={"every": 3, "frozen_base": "save"},  # whole, for DeepSpeed's zero_to_fp32
            )
            check(launch(cfg, n))
            out[f"{kind}-{n}"] = root / f"{kind}-{n}" / "checkpoints"
    bf = write_config(
        root / "bf16.yaml",
        out["gpt2-model"],
        root / "bf16",
        root / "cache",
        train={"max_steps": 2, "precision": "bf16"},
        checkpoint={"every": 2, "frozen_base": "save"},
    )
    check(launch(bf, 1))
    out["gpt2-bf16"] = root / "bf16" / "checkpoints"
    out["root"] = root
    return out


def framework_logits(model_dir, ckpt_dir):
    """The trained DSEE model rebuilt from DeepSpeed's own consolidation (unmerged forward)."""
    with torch.no_grad():
        return rebuilt(ckpt_dir, model_dir)(IDS).logits


@pytest.mark.parametrize("run", ["gpt2-1", "gpt2-2", "llama-2", "gpt2-bf16"])
def test_every_tensor_matches_deepspeed_consolidation(runs, run):
    ck = ZeroCheckpoint(runs[run])
    ref = deepspeed_params(runs[run])
    names = ck.names()
    assert set(names) | set(ck.shared) == set(ref)
    for n in names:
        t = ck.tensor(n)
        assert t.dtype == ref[n].dtype, n
        assert torch.equal(t, ref[n]), n


@pytest.mark.parametrize("kind,run", [("gpt2", "gpt2-2"), ("llama", "llama-2")])
def test_merged_export_loads_in_plain_transformers(runs, kind, run, tmp_path):
    out = tmp_path / "merged"
    export_checkpoint(str(runs[run]), str(out), max_shard_size="100KB")
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in files and "config.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1  # sharded
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("dsee" in k or "base_layer" in k for k in model.state_dict())
    # the config names its class, as transformers' own save_pretrained does
    assert model.config.architectures == [{"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[kind]]
    assert "auto_map" not in json.loads((out / "config.json").read_text())  # a standard type: no code
    with torch.no_grad():
        got = model(IDS).logits
    want = framework_logits(runs[f"{kind}-model"], runs[run])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # tied embeddings: written once, loaded tied
    if model.config.tie_word_embeddings:
        keys = set()
        for f in out.glob("*.safetensors"):
            keys |= set(load_file(str(f)))
        assert "lm_head.weight" not in keys
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_adapter_export_reapplied_to_base(runs, tmp_path):
    out = tmp_path / "adapter"
    s = export_checkpoint(str(runs["llama-2"]), str(out), mode="adapter")
    assert sorted(s["files"]) == ["adapter_model.safetensors", "dsee_config.json"]
    n_base = sum(p.numel() for p in tiny_llama(vocab_size=256).parameters())
    assert s["bytes"] < 0.2 * n_base * 4  # proportional to the trainable parameters
    base = AutoModelForCausalLM.from_pretrained(runs["llama-model"], dtype=torch.float32).eval()
    load_adapter(base, out)
    with torch.no_grad():
        got = base(IDS).logits
    torch.testing.assert_close(
        got, framework_logits(runs["llama-model"], runs["llama-2"]), rtol=1e-5, atol=1e-5
    )


def test_one_rank_and_two_rank_exports_agree(runs, tmp_path):
    a, b = tmp_path / "one", tmp_path / "two"
    export_checkpoint(str(runs["gpt2-1"]), str(a))
    export_checkpoint(str(runs["gpt2-2"]), str(b))
    sa, sb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert set(sa) == set(sb)
    for k in sa:  # same run; 2 ranks reduce gradients in another order (fp32 rounding only)
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)
    assert (a / "config.json").read_text() == (b / "config.json").read_text()


def test_bf16_frozen_weights_come_back_bf16(runs, tmp_path):
    out = tmp_path / "bf16"
    s = export_checkpoint(str(runs["gpt2-bf16"]), str(out))
    assert s["frozen_dtype"] == s["written_dtype"] == "bf16" and s["update_rounded_to_written_dtype"]
    exported = load_file(str(out / "model.safetensors"))
    original = load_file(str(runs["gpt2-model"] / "model.safetensors"))
    # an untouched frozen weight is the original, in bf16, bit for bit
    k = "transformer.h.0.mlp.c_fc.weight"
    assert exported[k].dtype == torch.bfloat16 and torch.equal(exported[k], original[k].to(torch.bfloat16))
    out32 = tmp_path / "bf16-as-fp32"
    assert export_checkpoint(str(runs["gpt2-bf16"]), str(out32), dtype="fp32")["written_dtype"] == "fp32"


def run_cli(*args):
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    return subprocess.run(
        [sys.executable, str(ROOT / "launchers" / "export.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_broken_checkpoints_give_one_line_errors(runs, tmp_path):
    bad = tmp_path / "ck"
    shutil.copytree(runs["gpt2-2"], bad)
    tag = (bad / "latest").read_text()
    r = run_cli(bad, tmp_path / "o1", "--tag", "step_99")
    assert r.returncode == 2 and "step_99" in r.stderr and tag in r.stderr and "Traceback" not in r.stderr

    f = bad / tag / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # truncated
    r = run_cli(bad, tmp_path / "o2")
    assert r.returncode == 2 and "zero_pp_rank_1_mp_rank_00_model_states.pt" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o2").exists()

    f.unlink()  # missing
    r = run_cli(bad, tmp_path / "o3")
    assert r.returncode == 2 and "zero_pp_rank_1_mp_rank_00_model_states.pt is missing" in r.stderr


def test_out_dir_is_never_half_written_or_silently_replaced(runs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run_cli(runs["gpt2-1"], out)
    assert r.returncode == 2 and "--force" in r.stderr and (out / "keep.txt").read_text() == "mine"

    import dsee_scale.export as ex

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ex.shards, "write_file", boom)
    with pytest.raises(RuntimeError):
        export_checkpoint(str(runs["gpt2-1"]), str(out), force=True)
    assert (out / "keep.txt").read_text() == "mine"  # untouched by the failed export
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial directory left
    monkeypatch.undo()
    r = run_cli(runs["gpt2-1"], out, "--force")
    assert r.returncode == 0 and not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_shard_sizes_in_decimal_and_binary_units():
    from dsee_scale.errors import UserError
    from dsee_scale.export import parse_size

    assert parse_size("2GiB") == 2**31 and parse_size("512MiB") == 2**29
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size("100") == 100
    for bad in ("2 apples", "GiB", "2XB", "1.5iB"):
        with pytest.raises(UserError, match="--max-shard-size"):
            parse_size(bad)


def test_streamed_shards_read_back_by_safetensors(tmp_path):
    """The streaming writer's files are what safetensors' own save_file would hold: every dtype
    a model has, tensors given in several pieces, shards cut at the size limit, and the
    header's byte count enforced."""
    from safetensors import safe_open

    from dsee_scale.export import shards

    g = torch.Generator().manual_seed(0)
    tensors = {"a.bf16": torch.randn(5, 7, generator=g).bfloat16(), "b.f32": torch.randn(3, generator=g),
               "c.i64": torch.arange(6).view(2, 3), "d.bool": torch.tensor([True, False, True]),
               "e.f16": torch.randn(4, 4, generator=g).half(), "f.scalar": torch.tensor(2.5)}  # fmt: skip
    planned = [shards.Planned(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    files = shards.plan_shards(planned, max_bytes=80)
    assert [[e.name for e in f] for f in files] == [
        ["a.bf16"],
        ["b.f32", "c.i64", "d.bool"],
        ["e.f16", "f.scalar"],
    ]  # 70, 63, 36 bytes
    for i, entries in enumerate(files):
        cut = [list(torch.tensor_split(tensors[e.name].reshape(-1), 3)) for e in entries]  # uneven pieces
        shards.write_file(tmp_path / f"{i}.safetensors", entries, cut, {"format": "pt"})
        with safe_open(str(tmp_path / f"{i}.safetensors"), framework="pt") as f:
            assert f.metadata() == {"format": "pt"} and sorted(f.keys()) == sorted(e.name for e in entries)
            for e in entries:
                assert f.get_tensor(e.name).dtype == tensors[e.name].dtype
                assert torch.equal(f.get_tensor(e.name), tensors[e.name])
    short = [shards.Planned("x", (4,), torch.float32)]
    with pytest.raises(ValueError, match="8 bytes produced, 16 planned"):
        shards.write_file(tmp_path / "short.safetensors", short, [[torch.zeros(2)]], {})
    assert list(shards.ahead(lambda i: i * i, range(5))) == [0, 1, 4, 9, 16]
