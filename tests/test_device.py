"""The device rule (dsee_scale/zero/comm.py), checked on a CPU machine with a stand-in accelerator.

A GPU run puts the engine's inputs and every collective's tensors on `cuda:<local rank>`; NCCL
refuses CPU tensors, so a path that forgets to move them fails there and nowhere here. These
tests make DeepSpeed's accelerator report another device ("meta", standing for the GPU), back it
with CPU memory (OnAccelerator below), and record where the tensors that reach the engine and
the collectives live. Code that builds its tensors on the CPU, or hands CPU batches to the
engine, fails them, as it would fail on a GPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from dsee_scale import zero
from dsee_scale.zero import comm

ACCEL = torch.device("meta")  # the stand-in accelerator device
CPU = torch.device("cpu")


def _unwrap(t):
    return t.elem if isinstance(t, OnAccelerator) else t


def _wrap(t):
    return OnAccelerator(t) if type(t) is torch.Tensor else t


class OnAccelerator(torch.Tensor):
    """A CPU tensor that reports device ACCEL: it stands for a tensor in accelerator memory.
    Every op computes on the CPU data and stays "on the accelerator"; `.cpu()` leaves it."""

    @staticmethod
    def __new__(cls, elem):
        return torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, dtype=elem.dtype, device=ACCEL, strides=elem.stride()
        )

    def __init__(self, elem):
        self.elem = elem

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # as on a GPU: CPU tensors (other than 0-dim scalars) do not mix with device tensors
        mixed = [t for t in tree_flatten((args, kwargs))[0] if type(t) is torch.Tensor and t.dim() > 0]
        if mixed:
            raise RuntimeError(f"{func}: expected all tensors on {ACCEL}, got CPU tensor(s) {mixed[0].shape}")
        leaving = kwargs.get("device") == CPU
        args, kwargs = tree_map(_unwrap, args), tree_map(_unwrap, kwargs)
        kwargs = {k: (CPU if k == "device" else v) for k, v in kwargs.items()}
        out = func(*args, **kwargs)
        return out if leaving else tree_map(_wrap, out)


class StandInAccelerator(TorchDispatchMode):
    """Tensors created on, or moved to, ACCEL become OnAccelerator tensors."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("device") == ACCEL:
            out = func(*tree_map(_unwrap, args), **dict(kwargs, device=CPU))
            return tree_map(_wrap, out)
        return func(*args, **kwargs)


@pytest.fixture
def accelerator(monkeypatch):
    """The accelerator reports ACCEL; two ranks; the collectives record their tensors' devices
    (and sum as if the other rank held the same values)."""
    from deepspeed.accelerator import get_accelerator

    seen: list[tuple[str, torch.device]] = []
    monkeypatch.setattr(get_accelerator(), "current_device_name", lambda: str(ACCEL))
    monkeypatch.setattr(comm, "rank_and_world", lambda: (0, 2))

    def all_reduce(t, *a, **k):
        seen.append(("all_reduce", t.device))
        t.mul_(2)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: seen.append(("barrier", ACCEL)))
    with StandInAccelerator():
        yield seen


class RecordingEngine:
    """What the training loop and evaluation see of DeepSpeed's engine, recording its inputs."""

    device = ACCEL

    def __init__(self):
        self.inputs: list[torch.device] = []

    def __call__(self, input_ids, labels, use_cache=True, **rest):
        assert labels.device == input_ids.device and all(v.device == input_ids.device for v in rest.values())
        self.inputs.append(input_ids.device)
        return SimpleNamespace(loss=torch.tensor(2.0).to(self.device))

    def backward(self, loss):
        pass

    def step(self):
        pass

    def eval(self):
        pass

    def train(self):
        pass


def test_the_training_step_feeds_the_engine_and_reduces_on_the_accelerator(accelerator):
    from dsee_scale.data import Blocks, Corpus
    from dsee_scale.experiment import load_experiment
    from dsee_scale.faults import nan_fault
    from dsee_scale.training.trainer import TrainingRun

    from helpers import ROOT

    run = TrainingRun(load_experiment(str(ROOT / "configs" / "gpt2-tiny.yaml")))
    run.engine, run.accum, run.rank, run.world = RecordingEngine(), 2, 0, 2
    run.corpus = Corpus(train=Blocks.from_ids(torch.randint(0, 256, (64, 16))), eval=None)
    run.fault = nan_fault(torch.nn.Module(), rank=1)  # no fault: rank 1 never gets one
    loss, _ = run.train_step(0)
    assert run.engine.inputs == [ACCEL, ACCEL]  # every micro-batch moved to the engine's device
    assert accelerator == [("all_reduce", ACCEL)]  # the loss mean over ranks, on the device
    assert loss == pytest.approx(2.0)  # (2 + 2) per rank, summed over 2 ranks, / (2 x 2)


def test_evaluation_feeds_the_engine_and_reduces_on_the_accelerator(accelerator):
    from dsee_scale.data import Blocks
    from dsee_scale.training.evaluate import evaluate

    engine = RecordingEngine()
    loss = evaluate(engine, Blocks.from_ids(torch.randint(0, 256, (5, 8))), batch_size=2)
    assert engine.inputs and set(engine.inputs) == {ACCEL}
    assert accelerator == [("all_reduce", ACCEL)]
    assert loss == pytest.approx(2.0)


def test_every_collective_helper_works_on_the_accelerator(accelerator, monkeypatch):
    assert comm.sum_over_ranks([1.0, 3.0]).tolist() == [2.0, 6.0]  # given back on the CPU
    assert comm.mean_over_ranks(5.0) == pytest.approx(5.0)
    comm.barrier()
    assert accelerator == [("all_reduce", ACCEL), ("all_reduce", ACCEL), ("barrier", ACCEL)]
    # a partitioned parameter's own data is a placeholder: new tensors beside it (DSEE's A, B,
    # S values and sparse_index) belong on the accelerator, not where the placeholder is
    w = torch.nn.Parameter(torch.empty(0))
    w.ds_id = 0
    assert zero.placement(w) == ACCEL
    assert zero.placement(torch.empty(3)) == CPU


def test_the_accelerator_chooses_the_engine_settings():
    from dsee_scale.experiment import load_experiment
    from dsee_scale.training.engine import deepspeed_config

    from helpers import ROOT

    def ds(json_name, accelerator):
        exp = load_experiment(
            str(ROOT / "configs" / "gpt2-tiny.yaml"), [f"deepspeed=ds_configs/{json_name}.json"]
        )
        return deepspeed_config(exp, 1, hidden_size=64, accelerator=accelerator)

    gpu, cpu = ds("zero3", "cuda"), ds("zero3", "cpu")
    assert gpu["optimizer"]["params"]["torch_adam"] is False  # DeepSpeed's FusedAdam
    assert cpu["optimizer"]["params"]["torch_adam"] is True
    assert gpu["zero_optimization"]["overlap_comm"] is True
    assert cpu["zero_optimization"]["overlap_comm"] is False
    z = gpu["zero_optimization"]
    assert (z["reduce_bucket_size"], z["stage3_prefetch_bucket_size"]) == (64 * 64, int(0.9 * 64 * 64))
    assert z["stage3_param_persistence_threshold"] == 640
    off_gpu, off_cpu = ds("zero3_offload_cpu", "cuda"), ds("zero3_offload_cpu", "cpu")
    for part in ("offload_optimizer", "offload_param"):
        assert off_gpu["zero_optimization"][part]["pin_memory"] is True
        assert off_cpu["zero_optimization"][part]["pin_memory"] is False
    # offloaded optimizer: DeepSpeedCPUAdam on either accelerator
    assert off_gpu["optimizer"]["params"]["torch_adam"] is False
    assert off_cpu["optimizer"]["params"]["torch_adam"] is False


@pytest.mark.parametrize("method", ["grebsmo", "svd", "magnitude", "random"])
def test_supports_are_chosen_on_the_accelerator(accelerator, method):
    """Under ZeRO-3 a rank selects supports on the gathered weight where it lives (the GPU)."""
    from dsee_scale.adapters.support import select_supports

    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    on_cpu = select_supports({"w": w}, 10, method, {"w": 3}, grebsmo_rounds=3)["w"]
    on_device = select_supports({"w": w.to(ACCEL)}, 10, method, {"w": 3}, grebsmo_rounds=3)["w"]
    assert torch.equal(on_device.cpu(), on_cpu)
