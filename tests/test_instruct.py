"""Instruction data: answer-only labels, chat templates, packing that keeps samples apart, the
over-long and malformed-record rules, and generation from a checkpoint and from its export."""

import json
import os
import subprocess
import sys

import pytest
import torch

from dsee_scale.data import IGNORE, ByteTokenizer, build_corpus
from dsee_scale.data.formats import chat_segments
from dsee_scale.errors import ConfigError, UserError
from dsee_scale.experiment import DataConfig

from helpers import (
    CHATML,
    LAUNCH_ENV,
    ROOT,
    check,
    launch,
    leaked_shm_buffers,
    save_chat_model,
    shm_buffers,
    tiny_gpt2,
    tiny_llama,
    write_config,
)


def cfg(tmp_path, **kw):
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return DataConfig(**kw)


def jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def all_rows(blocks):
    return blocks.rows(range(len(blocks)))


def test_prompt_completion_labels_token_by_token(tmp_path):
    f = jsonl(tmp_path / "pc.jsonl", [{"q": "2+2=", "a": "4"}, {"q": "Hi", "a": " there"}])
    c = build_corpus(
        cfg(tmp_path, format="prompt_completion", train_files=[f], prompt_field="q", completion_field="a",
            block_size=16),
        ByteTokenizer(),
    )  # fmt: skip
    r = all_rows(c.train)
    sample1 = list(b"2+2=4") + [0]  # EOS after the completion
    sample2 = list(b"Hi there") + [0]
    assert r["input_ids"].tolist() == [sample1 + sample2 + [0]]  # both fit one row, then padding
    assert r["labels"].tolist() == [[IGNORE] * 4 + [ord("4"), 0] + [IGNORE] * 2 + list(b" there") + [0]
                                    + [IGNORE]]  # fmt: skip
    assert r["position_ids"].tolist() == [list(range(6)) + list(range(9)) + [0]]
    assert c.train.info["packing"] == "packed" and c.train.answer_tokens() == 9


def test_chat_labels_only_on_assistant_turns_token_by_token(tmp_path):
    (tmp_path / "t.jinja").write_text(CHATML)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a?"},
            {"role": "assistant", "content": "A."}, {"role": "user", "content": "b?"},
            {"role": "assistant", "content": "B."}]  # fmt: skip
    f = jsonl(tmp_path / "chat.jsonl", [{"messages": conv}])
    c = build_corpus(cfg(tmp_path, format="chat", train_files=[f], chat_template=str(tmp_path / "t.jinja"),
                         block_size=256), ByteTokenizer())  # fmt: skip
    r = all_rows(c.train)
    ids, labels = r["input_ids"][0].tolist(), r["labels"][0].tolist()
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in conv)
    assert bytes(ids[: len(text)]).decode() == text
    answers = {text.index(s) + i for s in ("A.<|im_end|>\n", "B.<|im_end|>\n") for i in range(len(s))}
    for i in range(len(text)):  # exactly the assistant turns (with their end marker) are labels
        assert (labels[i] != IGNORE) == (i in answers), (i, text[i])
        if labels[i] != IGNORE:
            assert labels[i] == ids[i]
    assert all(x == IGNORE for x in labels[len(text) :])


def test_chat_template_round_trip_with_a_real_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(save_chat_model(tmp_path))
    conv = [{"role": "user", "content": "def add(a, b): return a + b"},
            {"role": "assistant", "content": "Return the sum of a and b."},
            {"role": "user", "content": "And def neg(x): return -x ?"},
            {"role": "assistant", "content": "Return minus x."}]  # fmt: skip
    f = jsonl(tmp_path / "chat.jsonl", [{"messages": conv}])
    c = build_corpus(cfg(tmp_path, format="chat", train_files=[f], block_size=128, packing=False), tok)
    r = all_rows(c.train)
    want = tok.apply_chat_template(conv, tokenize=True)["input_ids"]
    n = len(want)
    assert r["input_ids"][0, :n].tolist() == want  # the same ids as transformers renders
    assert r["attention_mask"][0].tolist() == [1] * n + [0] * (128 - n)  # padded, not packed
    answer = [
        i for i, lab in zip(r["input_ids"][0].tolist(), r["labels"][0].tolist(), strict=True) if lab != IGNORE
    ]
    assert tok.decode(answer) == "Return the sum of a and b.<|im_end|>\nReturn minus x.<|im_end|>\n"
    # what generation feeds the model is exactly the training prefix of the first answer
    prefix = tok.apply_chat_template(conv[:1], tokenize=True, add_generation_prompt=True)["input_ids"]
    first_label = r["labels"][0].tolist().index(next(x for x in r["labels"][0].tolist() if x != IGNORE))
    assert want[:first_label] == prefix
    segs = chat_segments(CHATML, tok, conv)
    assert [a for _, a in segs] == [False, True, False, True]


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_packed_samples_do_not_see_each_other(tmp_path, build):
    """A packed row's logits and loss equal those of its samples run one by one, with DSEE
    injected (the update is part of every projection)."""
    from dsee_scale.adapters import DSEEConfig, inject

    from helpers import randomize_dsee

    recs = [{"prompt": "x" * (3 + i), "completion": "yz" * (2 + i)} for i in range(4)]
    f = jsonl(tmp_path / "pc.jsonl", recs)
    model = build(
        vocab_size=256, **({"n_positions": 64} if build is tiny_gpt2 else {"max_position_embeddings": 64})
    )
    inject(model, DSEEConfig(r=2, alpha=4, num_sparse=8, support="magnitude"))
    randomize_dsee(model)
    model.eval()
    packed = build_corpus(
        cfg(tmp_path, format="prompt_completion", train_files=[f], block_size=48), ByteTokenizer()
    )
    one_per_row = cfg(tmp_path, format="prompt_completion", train_files=[f], block_size=48, packing=False)
    alone = build_corpus(one_per_row, ByteTokenizer())
    assert len(packed.train) < len(alone.train) == 4
    with torch.no_grad():
        p = all_rows(packed.train)
        out = model(**p, use_cache=False)
        seen = 0
        for row in range(len(packed.train)):
            starts = (p["position_ids"][row] == 0).nonzero().flatten().tolist() + [48]
            for a, b in zip(starts[:-1], starts[1:], strict=False):
                if p["labels"][row, a + 1 : b].eq(IGNORE).all():
                    continue  # the padding run
                ids = p["input_ids"][row : row + 1, a:b]
                ref = model(input_ids=ids, use_cache=False).logits
                torch.testing.assert_close(out.logits[row : row + 1, a:b], ref, rtol=1e-4, atol=1e-5)
                seen += 1
        assert seen == 4
        # the loss over answer tokens is the same whichever way the samples share rows
        a = all_rows(alone.train)
        loss_alone = model(**a, use_cache=False).loss
        torch.testing.assert_close(out.loss, loss_alone, rtol=1e-5, atol=1e-6)


def test_overlong_samples_follow_the_rule(tmp_path):
    f = jsonl(
        tmp_path / "pc.jsonl",
        [{"prompt": "p", "completion": "short"}, {"prompt": "p" * 5, "completion": "c" * 40}],
    )

    def build(rule):
        c = cfg(tmp_path, format="prompt_completion", train_files=[f], block_size=16, overlong=rule)
        return build_corpus(c, ByteTokenizer()).train

    drop = build("drop")
    assert drop.info["dropped"] == 1 and drop.answer_tokens() == len("short") + 1
    cut = build("truncate")
    assert cut.info["truncated"] == 1 and len(cut) == 2  # 7 + 16 tokens: two rows
    assert all_rows(cut)["input_ids"][1].tolist() == list(b"ppppp" + b"c" * 11)
    with pytest.raises(UserError, match=r"pc.jsonl:2: 46 tokens, longer than block_size=16"):
        build("error")


@pytest.mark.parametrize(
    "content,fmt,needle",
    [
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": ', "prompt_completion",
         "bad.jsonl:2: not a JSON object"),
        ('{"prompt": "a"}\n', "prompt_completion", "bad.jsonl:1: no field 'completion'"),
        ('{"prompt": "a", "completion": 3}\n', "prompt_completion",
         "bad.jsonl:1: field 'completion' must be a string"),
        ('["a", "b"]\n', "prompt_completion", "bad.jsonl:1: expected a JSON object"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', "chat", "bad.jsonl:1: no assistant message"),
        ('{"messages": [{"role": "user"}]}\n', "chat", "bad.jsonl:1: message 0 must be"),
        ('{"messages": "hello"}\n', "chat", "bad.jsonl:1: messages must be a non-empty list"),
    ],
)  # fmt: skip
def test_malformed_records_name_the_file_and_line(tmp_path, content, fmt, needle):
    (tmp_path / "bad.jsonl").write_text(content)
    (tmp_path / "t.jinja").write_text(CHATML)
    c = cfg(
        tmp_path,
        format=fmt,
        train_files=[str(tmp_path / "bad.jsonl")],
        chat_template=str(tmp_path / "t.jinja"),
    )
    with pytest.raises(UserError, match=needle.replace("[", r"\[")):
        build_corpus(c, ByteTokenizer())
    assert not list((tmp_path / "cache").glob("train-*"))  # nothing half-built is left as a cache


def test_instruction_formats_refuse_what_they_cannot_read(tmp_path):
    (tmp_path / "notes.txt").write_text("just text")
    with pytest.raises(ConfigError, match="reads records from .json, .jsonl, .parquet files"):
        build_corpus(
            cfg(tmp_path, format="prompt_completion", train_files=[str(tmp_path / "notes.txt")]),
            ByteTokenizer(),
        )
    f = jsonl(
        tmp_path / "c.jsonl",
        [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
    )
    with pytest.raises(ConfigError, match="tokenizer has no chat template"):
        build_corpus(cfg(tmp_path, format="chat", train_files=[f]), ByteTokenizer())


def test_malformed_record_through_the_launcher_is_one_line_exit_2(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 1}\n')
    out = tmp_path / "out"
    r = launch(ROOT / "configs" / "gpt2-tiny.yaml", 1, "data.source=null", "data.format=prompt_completion",
               f"data.train_files=[{tmp_path / 'bad.jsonl'}]", f"output_dir={out}",
               f"data.cache_dir={tmp_path / 'cache'}")  # fmt: skip
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(errors) == 1, r.stderr[-2000:]
    assert "bad.jsonl:2: field 'prompt' must be a string, got 1" in errors[0]
    assert not out.exists()


def generate(*args):
    cmd = [sys.executable, "-m", "dsee_scale", "generate", *map(str, args)]
    env = {**os.environ, **LAUNCH_ENV}
    return check(subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True))


def test_chat_tuning_logs_the_task_metric_and_generate_from_checkpoint_equals_export(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model_dir = save_chat_model(tmp_path)
    conv = [[{"role": "user", "content": f"name {i}"}, {"role": "assistant", "content": f"value {i % 3}"}]
            for i in range(40)]  # fmt: skip
    train = jsonl(tmp_path / "train.jsonl", [{"messages": m} for m in conv[:32]])
    heldout = jsonl(tmp_path / "heldout.jsonl", [{"messages": m} for m in conv[32:]])
    out = tmp_path / "run"
    config = write_config(
        tmp_path / "c.yaml", model_dir, out, tmp_path / "cache",
        data={"source": None, "format": "chat", "train_files": [train], "eval_files": [heldout],
              "block_size": 64, "max_train_blocks": None, "max_eval_blocks": None},
        eval={"every": 3, "batch_size": 2, "generate": 4, "max_new_tokens": 6, "show": 2},
    )  # fmt: skip
    shm = shm_buffers()
    check(launch(config, 2))
    assert not leaked_shm_buffers(shm)  # DeepSpeed's buffers released
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["eval_task"]) == {"exact_match", "chrf"}
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    assert {"eval/exact_match", "eval/chrf"} <= set(events.Tags()["scalars"])
    assert any("eval/generations" in t for t in events.Tags()["tensors"])
    # generate straight from the ZeRO-3 checkpoint (2 ranks' shards) and from its export
    check(subprocess.run([sys.executable, "-m", "dsee_scale", "export", str(out / "checkpoints"),
                          str(tmp_path / "export")], cwd=ROOT, capture_output=True, text=True))  # fmt: skip
    args = ["--chat", "--prompt", "name 33", "--prompt", "name 7", "--max-new-tokens", "8"]
    from_ckpt = generate(out, *args, "--out", tmp_path / "a.jsonl")
    from_export = generate(tmp_path / "export", *args, "--out", tmp_path / "b.jsonl")
    a = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert [x["completion"] for x in a] == [x["completion"] for x in b]
    assert [x["new_tokens"] for x in a] == [x["new_tokens"] for x in b] and a[0]["new_tokens"] > 0
    assert (
        "tokens/s" in from_ckpt.stdout and "checkpoint" in from_ckpt.stdout and "export" in from_export.stdout
    )
