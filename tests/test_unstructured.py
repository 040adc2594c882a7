"""Unstructured pruning: scores against the dense formulas, exact ratios, masks that stay."""

import pytest
import torch

from dsee_scale.adapters import DSEEConfig, inject, merge
from dsee_scale.adapters.layer import weight_out_in
from dsee_scale.pruning import unstructured as U

from helpers import randomize_dsee, tiny_gpt2, tiny_llama

IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def model_with_dsee(kind="llama"):
    m = tiny_llama() if kind == "llama" else tiny_gpt2()
    inject(m, DSEEConfig(r=2, num_sparse=10, support="magnitude"))
    randomize_dsee(m, scale=0.2)
    return m


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_abs_and_wabs_follow_the_dense_formula(kind):
    m = model_with_dsee(kind)
    layers = U.prunable(m)
    s_abs, s_wabs, s_mag = (U.scores(layers, k) for k in ("abs", "wabs", "magnitude"))
    for name, layer in layers.items():
        base = layer.base_layer if hasattr(layer, "base_layer") else layer
        W = weight_out_in(base).detach().float()
        if not hasattr(layer, "dsee"):
            assert torch.equal(s_abs[name], W.abs()) and torch.equal(s_wabs[name], W.abs())
            continue
        for sl, d in layer.dsee.items():  # independent dense reference of (alpha/r)(BA + S)
            lo, hi = layer.bounds(sl)
            S = torch.zeros(hi - lo, W.shape[1])
            S[d.sparse_index[0], d.sparse_index[1]] = d.sparse_values.detach()
            delta = d.scaling * (d.lora_B.detach() @ d.lora_A.detach() + S)
            torch.testing.assert_close(s_abs[name][lo:hi], delta.abs())
            torch.testing.assert_close(s_wabs[name][lo:hi], (W[lo:hi] + delta).abs())
        torch.testing.assert_close(s_mag[name], W.abs())


def test_wanda_uses_input_column_norms():
    m = model_with_dsee()
    layers = U.prunable(m, ["down_proj"])
    norms = U.input_norms(m, layers, [IDS])
    xs = []
    h = layers["model.layers.0.mlp.down_proj"].register_forward_pre_hook(lambda mod, a: xs.append(a[0]))
    m(input_ids=IDS)
    h.remove()
    want = xs[0].reshape(-1, xs[0].shape[-1]).norm(dim=0)
    torch.testing.assert_close(norms["model.layers.0.mlp.down_proj"], want, rtol=1e-5, atol=1e-6)
    s = U.scores(layers, "wanda", norms)["model.layers.0.mlp.down_proj"]
    w = layers["model.layers.0.mlp.down_proj"].weight.detach()
    torch.testing.assert_close(s, w.abs() * want[None, :], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_masks_prune_exactly_the_ratio(scope, ratio):
    m = model_with_dsee()
    layers = U.prunable(m)
    keep = U.masks(U.scores(layers, "wabs"), ratio, scope)
    total = sum(k.numel() for k in keep.values())
    pruned = sum(int((~k).sum()) for k in keep.values())
    assert abs(pruned - ratio * total) <= (len(keep) if scope == "layer" else 1)
    if scope == "layer":
        for k in keep.values():
            assert abs(int((~k).sum()) - ratio * k.numel()) <= 1
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        U.masks(U.scores(layers, "magnitude"), 1.0)


def test_masks_survive_retuning_and_merging_refills_unless_masked():
    m = model_with_dsee()
    layers = U.prunable(m)
    keep = U.masks(U.scores(layers, "magnitude"), 0.5)
    U.apply_masks(layers, keep)
    rep = U.sparsity_report(layers)
    assert rep["weight_sparsity"] == pytest.approx(0.5, abs=1e-3)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # re-tune A, B, S with the pruned W frozen
        m(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    assert U.sparsity_report(layers)["weight_sparsity"] == rep["weight_sparsity"]
    assert U.sparsity_report(layers)["merged_sparsity"] < rep["weight_sparsity"]  # B A is dense
    with torch.no_grad():
        before = m(input_ids=IDS).logits
    merge(m)
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=IDS).logits, before, rtol=1e-4, atol=1e-4)
    U.mask_merged(layers, keep)
    assert U.sparsity_report(layers)["merged_sparsity"] == pytest.approx(0.5, abs=1e-3)
