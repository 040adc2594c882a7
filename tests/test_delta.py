"""The DSEE layer against a dense reference W + (alpha/r)(BA + dense(S))."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from dsee_scale.adapters import delta as delta_module
from dsee_scale.adapters.delta import SparseLowRankDelta
from dsee_scale.adapters.layer import DSEELayer, weight_out_in

IN, OUT, R, ALPHA, N = 24, 30, 4, 8.0, 17


@pytest.fixture(autouse=True, params=["gather", "csr"])
def sparse_kernel(request, monkeypatch):
    """Every test on both ways S x is computed: gathers + index_add (small N, the default N=64)
    and the CSR sparse kernels (large N)."""
    monkeypatch.setattr(delta_module, "GATHER_MAX_N", 10**9 if request.param == "gather" else 0)
    return request.param


def make_layer(kind: str, slices=("full",)):
    torch.manual_seed(0)
    out = OUT * (3 if slices != ("full",) else 1)
    base = nn.Linear(IN, out) if kind == "linear" else Conv1D(out, IN)
    with torch.no_grad():
        base.weight.normal_()
        base.bias.normal_()
    base.requires_grad_(False)
    deltas = {}
    for i, s in enumerate(slices):
        g = torch.Generator().manual_seed(10 + i)
        flat = torch.randperm(OUT * IN, generator=g)[:N].sort().values
        d = SparseLowRankDelta(IN, OUT, R, ALPHA, torch.stack([flat // IN, flat % IN]))
        d.reset_parameters(g)
        with torch.no_grad():
            d.lora_B.normal_(generator=g)
            d.sparse_values.normal_(generator=g)
        deltas[s] = d
    return DSEELayer(base, deltas)


def dense_reference(layer: DSEELayer, x: torch.Tensor, keep: torch.Tensor | None = None):
    """The paper's formula with dense tensors: y = W x + b + (alpha/r)(B A x + S x); with `keep`
    (out x in) the update is multiplied by it entry-wise first."""
    W = weight_out_in(layer.base_layer).detach().clone()
    params = {}
    full = W.clone()
    for name, d in layer.dsee.items():
        lo, hi = layer.bounds(name)
        A = d.lora_A.detach().clone().requires_grad_()
        B = d.lora_B.detach().clone().requires_grad_()
        S = torch.zeros(OUT, IN)
        S[d.sparse_index[0], d.sparse_index[1]] = d.sparse_values.detach()
        S.requires_grad_()
        params[name] = (A, B, S)
        full = full.clone()
        update = d.scaling * (B @ A + S)
        full[lo:hi] = full[lo:hi] + (update if keep is None else update * keep[lo:hi])
    y = x @ full.T + layer.base_layer.bias
    return y, params


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("slices", [("full",), ("q", "v")])
def test_forward_and_gradients_match_dense_reference(kind, slices):
    layer = make_layer(kind, slices)
    x = torch.randn(3, 5, IN, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y = layer(x)
    y_ref, params = dense_reference(layer, x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)

    w = torch.randn_like(y)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    for name, d in layer.dsee.items():
        A, B, S = params[name]
        torch.testing.assert_close(d.lora_A.grad, A.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(d.lora_B.grad, B.grad, rtol=1e-4, atol=1e-4)
        rows, cols = d.sparse_index
        # our N-vector gradient is exactly the dense gradient of S at the support ...
        torch.testing.assert_close(d.sparse_values.grad, S.grad[rows, cols], rtol=1e-4, atol=1e-4)
        # ... and the dense S gradient is non-zero off the support: a dense S would train there.
        off = torch.ones_like(S.grad, dtype=torch.bool)
        off[rows, cols] = False
        assert S.grad[off].abs().sum() > 0
    assert layer.base_layer.weight.grad is None  # frozen


def test_autocast_bf16_matches_fp32_within_bf16_precision():
    """Mixed precision (torch.autocast, as AMP training runs): the update computes in bf16 like
    the base layer's matmul, gradients reach the fp32 A, B and S values, and they agree with the
    fp32 computation to bf16 precision (a mismatched dtype used to stop the forward)."""
    layer = make_layer("linear")
    x = torch.randn(3, 5, IN)
    w = torch.randn(3, 5, OUT)
    (layer(x).float() * w).sum().backward()
    want = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    (y.float() * w).sum().backward()
    for n, p in layer.named_parameters():
        if p.requires_grad:
            assert p.grad.dtype == torch.float32, n
            torch.testing.assert_close(p.grad, want[n], rtol=0.05, atol=0.05 * want[n].abs().max().item())


def test_no_dense_out_by_in_tensor_in_autograd_graph():
    """S x never saves a dense out x in tensor for backward (mask, dense S or its gradient)."""
    layer = make_layer("linear")
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    x = torch.randn(2, 3, IN, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer.dsee["full"](x).sum().backward()
    assert saved, "the hook saw no saved tensors"
    assert all(s != (OUT, IN) and s != (IN, OUT) for s in saved), saved
    assert max(int(torch.tensor(s).prod()) for s in saved) < OUT * IN


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("slices", [("full",), ("q", "v")])
def test_merge_then_unmerge(kind, slices):
    layer = make_layer(kind, slices)
    x = torch.randn(4, IN)
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert layer.merged
        y_merged = layer(x)
        layer.unmerge()
    torch.testing.assert_close(y_merged, y, rtol=1e-4, atol=1e-4)
    assert (layer.base_layer.weight - w0).abs().max() <= 1e-6
    torch.testing.assert_close(layer(x), y)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("slices", [("full",), ("q", "v")])
def test_keep_zeros_masks_the_update_by_the_pruned_weight(kind, slices):
    """dsee.keep_zeros (a pruned model's re-tuning): y = W x + ((alpha/r)(BA + S) * [W != 0]) x,
    against dense math with an explicit mask; A, B, S get the masked dense gradient, and merging
    keeps every zero of W (what the export writes)."""
    layer = make_layer(kind, slices)
    W = weight_out_in(layer.base_layer)
    with torch.no_grad():
        W[torch.rand(W.shape, generator=torch.Generator().manual_seed(3)) < 0.5] = 0.0
    zeros = W == 0
    layer.keep_zeros = True
    x = torch.randn(3, 5, IN)
    y = layer(x)
    y_ref, params = dense_reference(layer, x, keep=(~zeros).float())
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    unmasked = make_layer(kind, slices)
    with torch.no_grad():
        weight_out_in(unmasked.base_layer).copy_(W)
    assert (unmasked(x) - y).abs().max() > 1e-2  # the mask matters: a dense update differs
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    for name, d in layer.dsee.items():
        A, B, S = params[name]
        torch.testing.assert_close(d.lora_A.grad, A.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(d.lora_B.grad, B.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(d.sparse_values.grad, S.grad[d.sparse_index[0], d.sparse_index[1]])
    layer.merge()
    merged = weight_out_in(layer.base_layer)
    assert torch.equal(merged == 0, zeros)
    torch.testing.assert_close(layer(x), y_ref, rtol=1e-4, atol=1e-4)  # the merged W alone


def test_update_is_zero_at_init():
    d = SparseLowRankDelta(IN, OUT, R, ALPHA, torch.zeros(2, N, dtype=torch.long))
    d.reset_parameters(torch.Generator().manual_seed(0))
    assert d(torch.randn(3, IN)).abs().max() == 0
    assert d.lora_A.abs().sum() > 0


def test_fused_update_passes_gradcheck():
    from dsee_scale.adapters.delta import sparse_low_rank_update

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    A = torch.randn(2, 7, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(5, 2, dtype=torch.float64, generator=g, requires_grad=True)
    values = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    index = torch.tensor([[0, 0, 1, 3, 4, 4], [0, 6, 2, 2, 1, 5]])
    assert torch.autograd.gradcheck(lambda *t: sparse_low_rank_update(*t, index, 1.5), (x, A, B, values))


# The same checks on every device this machine has (the device check runs them on a GPU:
# `pytest tests/test_delta.py -k on_device`); here only "cpu".
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_on_device_forward_backward_match_the_dense_reference(device):
    layer = make_layer("conv1d", ("q", "v"))
    x = torch.randn(3, 5, IN)
    y_ref, _ = dense_reference(layer, x)
    layer = layer.to(device)
    assert all(d.sparse_index.device.type == device for _, d in layer.updates())
    xd = x.to(device).requires_grad_()
    y = layer(xd)
    torch.testing.assert_close(y.cpu(), y_ref, rtol=1e-4, atol=1e-4)
    y.square().sum().backward()
    assert all(
        p.grad is not None and p.grad.device.type == device for p in layer.parameters() if p.requires_grad
    )


@pytest.mark.parametrize("device", DEVICES)
def test_on_device_gradcheck_in_float64(device):
    from dsee_scale.adapters.delta import sparse_low_rank_update

    g = torch.Generator().manual_seed(1)
    shapes = {"x": (2, 3, 7), "A": (2, 7), "B": (5, 2), "values": (6,)}
    args = [
        torch.randn(s, dtype=torch.float64, generator=g).to(device).requires_grad_() for s in shapes.values()
    ]
    index = torch.tensor([[0, 0, 1, 3, 4, 4], [0, 6, 2, 2, 1, 5]], device=device)
    assert torch.autograd.gradcheck(lambda *t: sparse_low_rank_update(*t, index, 1.5), tuple(args))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
def test_on_device_half_precision_is_close_to_fp32(device, dtype):
    """bf16 / fp16 activations and weights (as a bf16 or fp16 ZeRO-3 run has them): index_add_
    in that dtype works and the update stays within its rounding of the fp32 one."""
    layer = make_layer("linear").to(device)
    x = torch.randn(4, 9, IN, device=device)
    with torch.no_grad():
        y32 = layer(x)
        y16 = layer.to(dtype)(x.to(dtype))
    assert y16.dtype == dtype
    rel = (y16.float() - y32).norm() / y32.norm()
    assert rel < (2e-2 if dtype == torch.bfloat16 else 5e-3), rel


def test_no_sparse_entries_is_plain_lora():
    """N = 0 (dsee.num_sparse: 0, or a slice whose every S entry structured pruning removed):
    the same code path computes B A x alone, forward and backward."""
    from dsee_scale.adapters.delta import sparse_low_rank_update

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    A = torch.randn(2, 7, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(5, 2, dtype=torch.float64, generator=g, requires_grad=True)
    values = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    index = torch.zeros(2, 0, dtype=torch.long)
    y = sparse_low_rank_update(x, A, B, values, index, 1.5)
    torch.testing.assert_close(y, 1.5 * x @ A.t() @ B.t())
    y.sum().backward()
    assert values.grad.shape == (0,) and x.grad is not None and A.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda *t: sparse_low_rank_update(*t, index, 1.5), (x, A, B, values))


def test_sparse_part_needs_positions_grouped_by_row_only():
    """The sparse kernels (CSR) need the positions grouped by row; within a row any order and
    repeated positions (which add) match the dense formula, forward and backward."""
    from dsee_scale.adapters.delta import sparse_low_rank_update

    g = torch.Generator().manual_seed(3)
    rows, cols = torch.tensor([0, 0, 0, 2, 2, 5, 5, 5]), torch.tensor([7, 1, 4, 3, 3, 8, 0, 2])
    x = torch.randn(4, 9, dtype=torch.float64, generator=g, requires_grad=True)
    A = torch.randn(2, 9, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(6, 2, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(8, dtype=torch.float64, generator=g, requires_grad=True)
    y = sparse_low_rank_update(x, A, B, v, torch.stack([rows, cols]), 1.5)
    S = torch.zeros(6, 9, dtype=torch.float64).index_put((rows, cols), v, accumulate=True)
    ref = 1.5 * (x @ A.T @ B.T + x @ S.T)
    torch.testing.assert_close(y, ref)
    w = torch.randn(y.shape, dtype=torch.float64, generator=g)
    for a, b in zip(
        torch.autograd.grad((y * w).sum(), (x, A, B, v)), torch.autograd.grad((ref * w).sum(), (x, A, B, v))
    ):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="by row"):
        SparseLowRankDelta(9, 6, 2, 4.0, torch.tensor([[2, 0], [1, 1]]))
