"""Corpora to rows: formats, caching, batches that do not depend on the rank count."""

import json

import pytest
import torch

from dsee_scale.data import ByteTokenizer, build_corpus, micro_batch
from dsee_scale.data.packing import pack_text
from dsee_scale.errors import ConfigError, UserError
from dsee_scale.experiment import DataConfig


def cfg(tmp_path, **kw):
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return DataConfig(**kw)


def ids_of(blocks) -> torch.Tensor:
    return blocks.rows(range(len(blocks)))["input_ids"]


def test_pack_joins_documents_with_eos_and_cuts_blocks():
    rows = pack_text({"input_ids": [[97, 98], [99, 100, 101]]}, block_size=3, eos=0)["input_ids"]
    assert rows == [[97, 98, 0], [99, 100, 101]]  # the final EOS is dropped


def test_text_json_jsonl_parquet_any_suffix_and_cache(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("hello world " * 20)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"line {i} " * 5}) for i in range(10)))
    (tmp_path / "c.json").write_text(json.dumps([{"text": "json doc " * 10}]))
    pq.write_table(pa.table({"text": ["parquet doc " * 10]}), tmp_path / "d.parquet")
    (tmp_path / "e.rst").write_text("Title\n=====\n" * 5)  # any suffix is a UTF-8 document
    c = cfg(
        tmp_path,
        train_files=[str(tmp_path / p) for p in ("*.txt", "b.jsonl", "c.json", "d.parquet", "e.rst")],
        eval_files=[str(tmp_path / "a.txt")],
        block_size=16,
    )
    corpus = build_corpus(c, ByteTokenizer())
    n_tokens = 240 + 1 + sum(len(f"line {i} " * 5) + 1 for i in range(10)) + 91 + 121 + 61
    train = ids_of(corpus.train)
    assert train.shape == (n_tokens // 16, 16)
    assert bytes(train[0].tolist()).startswith(b"hello world")
    assert b"Title\n=====" in bytes(train.flatten().tolist())
    batch = corpus.train.rows([0, 1])
    assert torch.equal(batch["labels"], batch["input_ids"])  # text: every token is a label
    cached = list((tmp_path / "cache").glob("train-*"))
    assert len(cached) == 1
    # a second build reads the cache (same key), a changed file makes a new one
    assert torch.equal(ids_of(build_corpus(c, ByteTokenizer()).train), train)
    (tmp_path / "a.txt").write_text("changed " * 40)
    build_corpus(c, ByteTokenizer())
    assert len(list((tmp_path / "cache").glob("train-*"))) == 2


def test_global_batch_is_the_same_for_any_rank_count(tmp_path):
    (tmp_path / "a.txt").write_text("".join(chr(65 + i % 26) for i in range(40)))
    blocks = build_corpus(
        cfg(tmp_path, train_files=[str(tmp_path / "a.txt")], block_size=2), ByteTokenizer()
    ).train
    assert len(blocks) == 20

    def mb(step, m, r, world, micro):
        return micro_batch(blocks, step, m, r, world, micro, 8, seed=3)["input_ids"]

    for step in range(7):  # wraps into a second epoch
        one = torch.cat([mb(step, m, 0, 1, 2) for m in range(4)])
        two = torch.cat([mb(step, m, r, 2, 2) for m in range(2) for r in range(2)])
        four = torch.cat([mb(step, 0, r, 4, 2) for r in range(4)])
        assert torch.equal(one, two) and torch.equal(one, four)
    epoch0 = torch.cat([micro_batch(blocks, s, 0, 0, 1, 4, 4, seed=3)["input_ids"] for s in range(5)])
    assert sorted(map(tuple, epoch0.tolist())) == sorted(map(tuple, ids_of(blocks).tolist()))


def test_bad_data_is_named(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"ok \xff\xfe not utf-8")
    with pytest.raises(UserError, match="not UTF-8"):
        build_corpus(cfg(tmp_path, train_files=[str(tmp_path / "bin.txt")]), ByteTokenizer())
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(UserError, match="fewer than block_size"):
        build_corpus(cfg(tmp_path, train_files=[str(tmp_path / "short.txt")]), ByteTokenizer())
    with pytest.raises(ConfigError, match="matches no file"):
        build_corpus(cfg(tmp_path, train_files=[str(tmp_path / "nope*.txt")]), ByteTokenizer())
    (tmp_path / "f.jsonl").write_text(json.dumps({"body": "x" * 100}))
    with pytest.raises(UserError, match="f.jsonl:1: no field 'text'"):
        build_corpus(cfg(tmp_path, train_files=[str(tmp_path / "f.jsonl")]), ByteTokenizer())


def test_hub_dataset_offline_is_a_clear_error(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(UserError, match="cannot load 'no-such/dataset'"):
        build_corpus(cfg(tmp_path, hub_dataset="no-such/dataset"), ByteTokenizer())
