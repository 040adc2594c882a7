"""Shared fixtures; the helpers themselves live in helpers.py (import them from there)."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from helpers import tiny_gpt2, tiny_llama  # noqa: E402


@pytest.fixture(params=["gpt2", "llama"])
def tiny_model(request):
    return request.param, (tiny_gpt2() if request.param == "gpt2" else tiny_llama())
