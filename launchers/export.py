#!/usr/bin/env python
"""Export a dsee-scale ZeRO-3 checkpoint (any number of ranks) to a loadable model.

    python launchers/export.py <checkpoint-dir> <out-dir> [--tag step_N] [--mode merged|adapter]
                               [--dtype auto|bf16|fp16|fp32] [--max-shard-size 2GB] [--force]

<checkpoint-dir> is <output_dir>/checkpoints (the tag comes from `latest` unless --tag) or one
step_N directory. merged: a Hugging Face directory for AutoModelForCausalLM.from_pretrained;
adapter: DSEE's A, B, S for dsee_scale.load_adapter(base_model, out_dir). No DeepSpeed launch, no GPU.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsee_scale.errors import cli_main  # noqa: E402


@cli_main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--tag", help="checkpoint tag (default: the one in 'latest')")
    ap.add_argument("--mode", default="merged", choices=["merged", "adapter"])
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                    help="auto: the frozen weights' dtype (merged) / fp32 (adapter)")
    ap.add_argument("--max-shard-size", default="2GB")
    ap.add_argument("--force", action="store_true", help="replace a non-empty out_dir")
    args = ap.parse_args()

    from tqdm import tqdm

    from dsee_scale.export import export_checkpoint

    bar = tqdm(desc=f"export ({args.mode})", unit="tensor")

    def progress(done, total):
        bar.total = total
        bar.update(done - bar.n)

    t0 = time.perf_counter()
    s = export_checkpoint(args.checkpoint_dir, args.out_dir, args.tag, args.mode, args.dtype,
                          args.max_shard_size, args.force, progress)
    bar.close()
    note = ""
    if s.get("update_rounded_to_written_dtype"):
        note = (f" (the fp32 update is rounded into {s['written_dtype']} weights; "
                "--dtype fp32 keeps it exact)")
    if s.get("block_weight_zero_fraction"):
        note += f"; {100 * s['block_weight_zero_fraction']:.1f}% of the block weights are zero"
    print(f"wrote {args.out_dir}: {len(s['files'])} files, {s['bytes'] / 2**20:.1f} MiB, "
          f"{s['written_dtype']}, from {s['tag']} of {s['world_size']} rank(s) "
          f"in {time.perf_counter() - t0:.1f}s{note}")


if __name__ == "__main__":
    main()
