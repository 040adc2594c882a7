"""`dsee-scale` (or `python -m dsee_scale`): every stage of the pipeline as a subcommand.

    dsee-scale train    --config X.yaml [--deepspeed J.json] [--resume] [section.key=value ...]
    dsee-scale prune    --config X.yaml --from RUN/checkpoints [...] | --resume
    dsee-scale export   CHECKPOINTS OUT_DIR [--tag T] [--mode merged|adapter] [--dtype D] ...
    dsee-scale generate SOURCE --prompt P [--prompt-file F] [--chat] [--max-new-tokens N] ...
    dsee-scale inspect  --config X.yaml [section.key=value ...]
    dsee-scale hostfile --slots N [--nodelist 'gpu[01-04]'] [--out hostfile]

`train` and `prune` run on every rank: start them with the DeepSpeed launcher
(`deepspeed launchers/train.py ...` is `dsee-scale train ...` on each rank), torchrun, srun, or
as one plain process. Bad input of any kind is one `error:` line and exit code 2.
"""

from __future__ import annotations

import argparse
import time
import warnings

from .errors import UserError, cli_main

DESCRIPTIONS = {
    "train": "tune a model with DSEE on DeepSpeed (run on every rank)",
    "prune": "prune a DSEE-tuned checkpoint, then re-tune it (run on every rank)",
    "export": "a ZeRO-3 checkpoint -> a merged Hugging Face model or a DSEE adapter",
    "generate": "answer prompts with an exported model or straight from a training checkpoint",
    "inspect": "validate a config and show what DSEE would train",
    "hostfile": "a DeepSpeed hostfile from a Slurm node list",
}


def _experiment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("--deepspeed", help="engine JSON (overrides the YAML's deepspeed:)")
    p.add_argument("--resume", action="store_true", help="continue from <output_dir>/checkpoints/latest")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="section.key=value (values parsed as YAML)")


def _load(args):
    from .experiment import load_experiment

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed deprecations
    overrides = list(args.overrides) + ([f"deepspeed={args.deepspeed}"] if args.deepspeed else [])
    return load_experiment(args.config, overrides)


def _train(args) -> None:
    from .training.distributed import exit_now
    from .training.trainer import run

    run(_load(args), resume=args.resume)
    exit_now(0)


def _prune(args) -> None:
    from .pruning.run import prune_and_retune
    from .training.distributed import exit_now

    prune_and_retune(_load(args), args.from_dir, resume=args.resume)
    exit_now(0)


def _export(args) -> None:
    from tqdm import tqdm

    from .export import export_checkpoint

    bar = tqdm(desc=f"export ({args.mode})", unit="tensor")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    t0 = time.perf_counter()
    s = export_checkpoint(
        args.checkpoint_dir, args.out_dir, args.tag, args.mode, args.dtype, args.max_shard_size,
        args.force, progress, fmt=args.format, gguf_types=args.gguf_type,
    )  # fmt: skip
    bar.close()
    note = ""
    if s.get("update_rounded_to_written_dtype"):
        note = f" (the fp32 update is rounded into {s['written_dtype']} weights; --dtype fp32 keeps it exact)"
    if s.get("block_weight_zero_fraction"):
        note += f"; {100 * s['block_weight_zero_fraction']:.1f}% of the block weights are zero"
    print(
        f"wrote {args.out_dir}: {len(s['files'])} files, {s['bytes'] / 2**20:.1f} MiB, "
        f"{s['written_dtype']}, from {s['tag']} of {s['world_size']} rank(s) "
        f"in {time.perf_counter() - t0:.1f}s{note}"
    )


def _generate(args) -> None:
    import json

    import torch

    from .data.formats import chat_template_of
    from .export.loaded import load_for_generation
    from .generation import Sample, generate_one, input_ids, read_prompts

    prompts = read_prompts(args.prompt or [], args.prompt_file)
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserError("generate: --max-new-tokens >= 1, --temperature >= 0 and 0 < --top-p <= 1")
    torch.manual_seed(args.seed)
    model, tok, what = load_for_generation(args.source, args.tag)
    if tok is None:
        raise UserError(f"generate: {args.source!r} has no tokenizer (a random test model?)")
    template = chat_template_of(tok, args.chat_template) if args.chat or args.chat_template else None
    records, new, seconds = [], 0, 0.0
    for p in prompts:
        g = generate_one(model, tok, input_ids(tok, Sample(p, ""), template), args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p)  # fmt: skip
        new, seconds = new + g.new_tokens, seconds + g.seconds
        records.append({"prompt": p, "completion": g.text, "new_tokens": g.new_tokens, "seconds": g.seconds})
        if not args.out:
            print(f"### prompt\n{p}\n### answer\n{g.text}\n", flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    how = (
        "greedy" if args.temperature == 0 else f"sampled (temperature {args.temperature}, top-p {args.top_p})"
    )
    rate = new / max(seconds, 1e-9)
    chat = ", chat template" if template else ""
    print(
        f"{len(prompts)} prompt(s), {new} new tokens in {seconds:.2f}s: {rate:.1f} tokens/s "
        f"({how}, {what}{chat})"
    )


def _inspect(args) -> None:
    from .adapters import expected_trainable_count, inject, trainable_parameter_count
    from .adapters.inject import target_shape
    from .models import load_model

    exp = _load(args)
    model = load_model(exp.model)
    t0 = time.perf_counter()
    targets = inject(model, exp.dsee)
    elapsed = time.perf_counter() - t0
    total = sum(p.numel() for p in model.parameters())
    for t in targets:
        rows, cols = target_shape(model, t)
        print(f"{t.key:50s} {rows:6d} x {cols:<6d} r={exp.dsee.r} N={exp.dsee.n_for(rows, cols)}")
    n = trainable_parameter_count(model)
    assert n == expected_trainable_count(model, targets, exp.dsee)
    print(
        f"targets: {len(targets)}  trainable: {n:,} of {total:,} ({100 * n / total:.3f}%)  "
        f"support: {exp.dsee.support} in {elapsed:.1f}s"
    )


def _hostfile(args) -> None:
    import os

    from .training.distributed import hostfile, slurm_hostnames

    nodelist = args.nodelist or os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise UserError(
            "hostfile: give --nodelist or run inside a Slurm allocation (SLURM_JOB_NODELIST is not set)"
        )
    if args.slots < 1:
        raise UserError(f"hostfile: --slots must be >= 1, got {args.slots}")
    text = hostfile(slurm_hostnames(nodelist), args.slots)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text, end="")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="dsee-scale", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help=DESCRIPTIONS["train"], description=DESCRIPTIONS["train"])
    _experiment_args(p)
    p.set_defaults(func=_train)
    p = sub.add_parser("prune", help=DESCRIPTIONS["prune"], description=DESCRIPTIONS["prune"])
    _experiment_args(p)
    p.add_argument("--from", dest="from_dir", help="the tuning run's checkpoints (or one step_N dir)")
    p.set_defaults(func=_prune)
    p = sub.add_parser("export", help=DESCRIPTIONS["export"], description=DESCRIPTIONS["export"])
    p.add_argument("checkpoint_dir", help="<output_dir>/checkpoints (tag from `latest`) or a step_N dir")
    p.add_argument("out_dir")
    p.add_argument("--tag", help="checkpoint tag (default: the one in 'latest')")
    p.add_argument("--mode", default="merged", choices=["merged", "adapter"])
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bf16", "fp16", "fp32"],
        help="auto: the frozen weights' dtype (merged) / fp32 (adapter)",
    )
    p.add_argument("--max-shard-size", default="2GB", help="e.g. 500MB, 2GB (10^9), 2GiB (2^30)")
    p.add_argument("--force", action="store_true", help="replace a non-empty out_dir")
    p.add_argument(
        "--format",
        default="safetensors",
        choices=["safetensors", "gguf"],
        help="safetensors: a Hugging Face directory; gguf: llama.cpp files (LLaMA family)",
    )
    p.add_argument(
        "--gguf-type",
        default="f16",
        help="with --format gguf: f16, q8_0, bf16, f32, or a comma-separated list (one file each)",
    )
    p.set_defaults(func=_export)
    p = sub.add_parser("generate", help=DESCRIPTIONS["generate"], description=DESCRIPTIONS["generate"])
    p.add_argument("source", help="an exported model directory, or <output_dir>[/checkpoints[/step_N]]")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help='prompts: .jsonl with a "prompt" field, else one per line')
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--chat-template", help="a Jinja chat template file (implies --chat)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--tag", help="checkpoint tag (default: the one in 'latest')")
    p.add_argument("--out", help="write JSONL records (prompt, completion, new_tokens, seconds) here")
    p.set_defaults(func=_generate)
    p = sub.add_parser("inspect", help=DESCRIPTIONS["inspect"], description=DESCRIPTIONS["inspect"])
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.set_defaults(func=_inspect, deepspeed=None)
    p = sub.add_parser("hostfile", help=DESCRIPTIONS["hostfile"], description=DESCRIPTIONS["hostfile"])
    p.add_argument("--slots", type=int, required=True, help="processes (GPUs) per node")
    p.add_argument("--nodelist", help="Slurm node list (default: $SLURM_JOB_NODELIST)")
    p.add_argument("--out", help="write here instead of stdout")
    p.set_defaults(func=_hostfile)
    return ap


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
