"""checkpoint.frozen_base (issue #15): checkpoints that reference the frozen base in the model's own
files (checksummed) instead of copying every frozen fragment on every save. References: a run
that saves the frozen weights (DeepSpeed's default), trained alike; the model's files themselves."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsee_scale.checkpoint import ZeroCheckpoint
from dsee_scale.checkpoint import format as fmt
from dsee_scale.checkpoint.base import BaseWeights, name_in, references_base
from dsee_scale.errors import ConfigError, UserError
from dsee_scale.export import export_checkpoint
from dsee_scale.models import ModelConfig

from helpers import check, launch, losses, save_tiny_model, write_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2 ranks, 4 steps, checkpoints at 2 and 4: saving the frozen weights, and referencing them
    (the default for a model directory) stopped at step 2 and resumed."""
    root = tmp_path_factory.mktemp("frozen_base")
    model = save_tiny_model(root, "llama", initializer_range=0.1)

    def config(name, model_dir=model, **ck):
        return write_config(root / f"{name}.yaml", model_dir, root / name, root / "cache",
                            train={"max_steps": 4, "lr": 3e-2}, eval={"every": 4},
                            checkpoint={"every": 2, "keep_last": 3, **ck})  # fmt: skip

    check(launch(config("saved", frozen_base="save"), 2))
    ref = config("referenced")
    check(launch(ref, 2, "train.stop_at_step=2"))
    check(launch(ref, 2, "--resume"))
    return root, model, config


def model_states_bytes(d):
    return sum(p.stat().st_size for p in d.glob("zero_pp_rank_*_model_states.pt"))


def test_referenced_checkpoints_hold_no_frozen_weights_and_resume_exactly(runs):
    root, model, _ = runs
    saved, ref = root / "saved" / "checkpoints", root / "referenced" / "checkpoints"
    want, got = losses(root / "saved"), losses(root / "referenced")
    assert sorted(got) == [1, 2, 3, 4]
    for s in got:  # the resumed run continues exactly as the run that saved everything
        assert got[s] == pytest.approx(want[s], rel=1e-6, abs=1e-6), (s, got, want)
    meta = fmt.read_meta(ref / "step_4")
    weights = str((model / "model.safetensors").resolve())
    assert meta["base"]["files"][weights]["sha256"] == fmt.sha256_file(model / "model.safetensors")
    assert meta["base"]["dtype"] == "float32" and "base" not in fmt.read_meta(saved / "step_4")
    # the frozen weights are the bulk of the saved run's files, and absent from the referenced
    assert model_states_bytes(ref / "step_4") * 4 < model_states_bytes(saved / "step_4")
    a, b = ZeroCheckpoint(saved), ZeroCheckpoint(ref)
    assert a.names() == b.names() and a.frozen_shapes == b.frozen_shapes and len(a.frozen_shapes) > 10
    base = load_file(str(model / "model.safetensors"))
    for name in a.names():
        x, y = a.tensor(name), b.tensor(name)
        assert torch.allclose(x, y, rtol=1e-6, atol=1e-7), name
        if name in b.frozen_shapes:  # read from the model's own file, DSEE's base_layer dropped
            assert torch.equal(y, base[b.meta["base"]["names"][name]]), name
    assert any(torch.count_nonzero(a.tensor(n)) for n in a.trainable_shapes if n.endswith("lora_B"))
    ea, eb = export_checkpoint(str(saved), str(root / "export-saved")), None
    eb = export_checkpoint(str(ref), str(root / "export-referenced"))
    assert ea["files"] == eb["files"]
    x, y = (load_file(str(root / e / "model.safetensors")) for e in ("export-saved", "export-referenced"))
    assert sorted(x) == sorted(y) and all(torch.allclose(x[k], y[k], rtol=1e-6, atol=1e-7) for k in x)


def test_a_changed_base_is_refused_by_resume_and_export_and_nothing_is_lost(runs, tmp_path):
    root, model, config = runs
    mine = tmp_path / "model"
    shutil.copytree(model, mine)
    cfg = config("changed", model_dir=mine)
    check(launch(cfg, 1, "train.max_steps=2", "train.stop_at_step=1"))
    weights = load_file(str(mine / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1.0
    save_file(weights, str(mine / "model.safetensors"), metadata={"format": "pt"})
    ckpt_dir = root / "changed" / "checkpoints"
    before = sorted((p.relative_to(ckpt_dir), p.stat().st_size) for p in ckpt_dir.rglob("*") if p.is_file())
    r = launch(cfg, 1, "--resume", "train.max_steps=2")
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert "saved no frozen weights" in line and "model.safetensors" in line and "sha256" in line, line
    with pytest.raises(UserError, match="does not match the sha256 it was trained on"):
        export_checkpoint(str(ckpt_dir), str(tmp_path / "export"))
    after = sorted((p.relative_to(ckpt_dir), p.stat().st_size) for p in ckpt_dir.rglob("*") if p.is_file())
    assert before == after and not (tmp_path / "export").exists()


def test_which_runs_reference_their_base():
    random_weights = ModelConfig(config={"model_type": "llama"})
    assert references_base("auto", random_weights, custom_build=False) is False  # nothing to reload
    with pytest.raises(ConfigError, match="from_source is not possible here .model.config builds random"):
        references_base("from_source", random_weights, custom_build=False)
    with pytest.raises(ConfigError, match="built by the pruning stage"):  # a pruned re-tune saves its W
        references_base("from_source", ModelConfig(path="."), custom_build=True)
    assert references_base("save", ModelConfig(path="."), custom_build=False) is False


def test_frozen_names_are_found_with_or_without_the_models_prefix(tmp_path):
    """A GPT-2 directory written by save_pretrained says transformer.h.0...; the original hub files
    say h.0...: from_pretrained accepts both, and so does the base reader."""
    save_file({"h.0.attn.c_attn.weight": torch.ones(2, 6)}, str(tmp_path / "model.safetensors"))
    base = BaseWeights(ModelConfig(path=str(tmp_path)), "float32")
    assert name_in(base, "transformer.h.0.attn.c_attn.base_layer.weight") == "h.0.attn.c_attn.weight"
    assert name_in(base, "transformer.h.1.attn.c_attn.base_layer.weight") is None
    assert json.loads(json.dumps(base.shape("h.0.attn.c_attn.weight"))) == [2, 6]
