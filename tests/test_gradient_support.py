"""dsee.support gradient (RoSA's mask): Omega = top N of sum over calibration micro-batches of
(dL/dW)^2, against plain autograd on the frozen weight itself, in the library and through the
launcher on 1 and 2 ranks (ZeRO-3)."""

import json

import pytest
import torch

from dsee_scale.adapters import DSEEConfig, inject, resolve_targets
from dsee_scale.adapters.gradient import squared_gradient_scores, supports_from_scores
from dsee_scale.adapters.inject import target_shape, target_weight
from dsee_scale.adapters.support import top_n

from helpers import check, launch, save_tiny_model, tiny_gpt2, tiny_llama, write_config


def plain_scores(model, cfg, batches):
    """sum over batches of (dL/dW)^2 by autograd on W itself (out x in, slices of fused c_attn)."""
    targets = resolve_targets(model, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    scores = {t.key: torch.zeros(target_shape(model, t)) for t in targets}
    weights = {t.module for t in targets}
    for name in weights:
        model.get_submodule(name).weight.requires_grad_(True)
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**batch, use_cache=False).loss.backward()
        for t in targets:
            scores[t.key] += grad_of(model, t).pow(2)
    return targets, scores


def grad_of(model, t):
    """dL/dW of one target as out x in, from the layer's .grad (Conv1D stores in x out)."""
    layer = model.get_submodule(t.module)
    saved = layer.weight.data
    layer.weight.data = layer.weight.grad
    try:
        return target_weight(model, t).detach().clone()
    finally:
        layer.weight.data = saved


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_scores_are_the_squared_weight_gradients(build):
    g = torch.Generator().manual_seed(0)
    batches = [
        {"input_ids": (ids := torch.randint(0, 96, (2, 12), generator=g)), "labels": ids} for _ in range(3)
    ]
    names = ["c_attn:q", "c_attn:v"] if build is tiny_gpt2 else ["q_proj", "v_proj"]
    cfg = DSEEConfig(r=2, num_sparse=10, support="gradient", target_modules=names)
    targets, want = plain_scores(build(), cfg, batches)
    model = build()
    placeholder = {t.key: torch.zeros(2, 10, dtype=torch.long) for t in targets}
    inject(model, cfg, placeholder)
    got = squared_gradient_scores(model, targets, batches, lambda b: model(**b, use_cache=False).loss)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-10)
    supports = supports_from_scores(got, cfg.n_for)
    assert all(torch.equal(supports[k], top_n(want[k], 10)) for k in want)
    # a subset: the same numbers for the targets a rank owns, nothing for the others
    mine = {targets[0].key}
    part = squared_gradient_scores(model, targets, batches, lambda b: model(**b, use_cache=False).loss, mine)
    assert set(part) == mine and torch.allclose(part[targets[0].key], got[targets[0].key])


def test_library_inject_without_supports_names_what_gradient_needs():
    from dsee_scale.errors import UserError

    with pytest.raises(UserError, match="support gradient needs calibration batches"):
        inject(tiny_llama(), DSEEConfig(support="gradient"))


def test_launcher_chooses_the_gradient_support_alike_on_one_and_two_ranks(tmp_path):
    from safetensors.torch import load_file

    from dsee_scale.checkpoint import format as fmt
    from dsee_scale.data import ByteTokenizer, build_corpus, micro_batch
    from dsee_scale.experiment import load_experiment
    from dsee_scale.models import load_model

    model_dir = save_tiny_model(tmp_path, "llama")
    runs = {}
    for world in (1, 2):
        cfg = write_config(tmp_path / f"g{world}.yaml", model_dir, tmp_path / f"g{world}", tmp_path / "cache",
                           dsee={"support": "gradient", "gradient_batches": 3, "num_sparse": 12},
                           train={"max_steps": 2}, checkpoint={"every": 2})  # fmt: skip
        check(launch(cfg, world))
        tag = (tmp_path / f"g{world}" / "checkpoints" / fmt.LATEST).read_text().strip()
        runs[world] = load_file(str(tmp_path / f"g{world}" / "checkpoints" / tag / fmt.SUPPORTS))
        summary = json.loads((tmp_path / f"g{world}" / "summary.json").read_text())
        assert summary["final_step"] == 2
    exp = load_experiment(str(tmp_path / "g1.yaml"))
    corpus = build_corpus(exp.data, ByteTokenizer())
    t = exp.train
    batches = [
        micro_batch(corpus.train, s, 0, 0, 1, t.micro_batch_size, t.micro_batch_size, t.seed)
        for s in range(3)
    ]
    model = load_model(exp.model).eval()
    _, want = plain_scores(model, exp.dsee, batches)
    assert set(runs[1]) == set(want)
    for k, score in want.items():
        assert torch.equal(runs[1][k], top_n(score, 12)), k
        assert torch.equal(runs[2][k], runs[1][k]), k
