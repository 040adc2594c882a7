"""What each kind of weight sparsity buys at inference: one linear layer's forward, timed per kernel.

    python bench/sparsity_speed.py                    # this machine (CPU: fp32; CUDA: bf16)
    python bench/sparsity_speed.py --tokens 64 --shapes smollm2-135m    # smaller (the tests)

For the projections of SmolLM2-135M and LLaMA-2-7B (y = x W^T, x of --tokens rows), in one
process, against the dense matmul of the unpruned W measured beside it:
  dense-50%-zeros   W with half of each row zeroed, still a dense tensor (what an unstructured
                    export is to every dense kernel: the zeros cost the same as any value)
  csr-50%           the same W as a torch.sparse CSR matrix (torch's sparse x dense product)
  2:4-semi          the same W pruned 2:4 (2 of every 4 consecutive inputs) as
                    torch.sparse.to_sparse_semi_structured: sparse tensor cores, CUDA only
                    (Ampere or newer); on other devices the row says why it did not run
  structured-25%    a quarter of W's output rows removed (input columns for down_proj): a
                    smaller dense matrix, as after removing heads / MLP channels
Timing: torch.utils.benchmark.Timer.blocked_autorange (synchronises CUDA), median per call.
Results: bench/results/sparsity_speed_<device>.json.
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from common import write_result

SHAPES = {  # (out, in) of each projection
    "smollm2-135m": {"q_proj": (576, 576), "gate_proj": (1536, 576), "down_proj": (576, 1536)},
    "llama-2-7b": {"q_proj": (4096, 4096), "gate_proj": (11008, 4096), "down_proj": (4096, 11008)},
}


def two_four(w: torch.Tensor) -> torch.Tensor:
    """W with the 2 smallest of every 4 consecutive inputs of each row zeroed."""
    g = w.reshape(w.shape[0], -1, 4)
    keep = g.abs().topk(2, dim=-1).indices
    return torch.zeros_like(g).scatter(-1, keep, g.gather(-1, keep)).reshape(w.shape)


def half_zeros(w: torch.Tensor) -> torch.Tensor:
    """W with the smaller half of each row zeroed (per-output unstructured, as Wanda's group)."""
    k = w.shape[1] // 2
    drop = w.abs().topk(k, dim=1, largest=False).indices
    return w.scatter(1, drop, 0.0)


def median_us(fn) -> float:
    t = benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.5)
    return t.median * 1e6


def kernels(w: torch.Tensor, x: torch.Tensor, name: str) -> dict:
    """kind -> a call of y = x W^T with that kernel, or the reason it cannot run here."""
    out: dict = {"dense": lambda: F.linear(x, w)}
    wz = half_zeros(w)
    out["dense-50%-zeros"] = lambda: F.linear(x, wz)
    try:
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            csr = wz.to_sparse_csr()
        out["csr-50%"] = lambda: torch.mm(csr, x.t()).t()
    except (RuntimeError, NotImplementedError) as e:
        out["csr-50%"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    if w.device.type == "cuda":
        try:
            semi = torch.sparse.to_sparse_semi_structured(two_four(w))
            out["2:4-semi"] = lambda: F.linear(x, semi)
        except (RuntimeError, NotImplementedError, ValueError) as e:
            out["2:4-semi"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    else:
        out["2:4-semi"] = "to_sparse_semi_structured needs CUDA sparse tensor cores (Ampere or newer)"
    if name == "down_proj":  # channels removed: fewer inputs (the activations arrive already narrower)
        cols = w[:, : w.shape[1] * 3 // 4].contiguous()
        xc = x[:, : cols.shape[1]].contiguous()
        out["structured-25%"] = lambda: F.linear(xc, cols)
    else:
        rows = w[: w.shape[0] * 3 // 4].contiguous()
        out["structured-25%"] = lambda: F.linear(x, rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=None, help="rows of x (default: 2048 on CUDA, 512 on CPU)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokens = args.tokens or (2048 if device == "cuda" else 512)
    gen = torch.Generator().manual_seed(0)
    rows: dict[str, dict] = {}
    for model in args.shapes.split(","):
        for name, (o, i) in SHAPES[model].items():
            w = (torch.randn(o, i, generator=gen) / i**0.5).to(device, dtype)
            x = torch.randn(tokens, i, generator=gen).to(device, dtype)
            row: dict = {"shape": [o, i]}
            with torch.no_grad():
                for kind, fn in kernels(w, x, name).items():
                    if isinstance(fn, str):
                        row[kind] = {"skipped": fn}
                        continue
                    row[kind] = {"us": median_us(fn)}
                dense = row["dense"]["us"]
                for r in row.values():
                    if isinstance(r, dict) and "us" in r:
                        r["speedup_vs_dense"] = dense / r["us"]
            rows[f"{model}/{name}"] = row
            speedups = {k: round(v.get("speedup_vs_dense", 0), 2) for k, v in row.items() if k != "shape"}
            print(model, name, speedups, flush=True)
    card = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    slug = "".join(c if c.isalnum() else "_" for c in card.lower()).strip("_")
    write_result(
        f"sparsity_speed_{slug}",
        {"device": card, "dtype": str(dtype).removeprefix("torch."), "tokens": tokens, "rows": rows},
    )


if __name__ == "__main__":
    main()
