#!/usr/bin/env python
"""Answer prompts with an exported model or straight from a training checkpoint:
`dsee-scale generate`, no DeepSpeed launch.

    python launchers/generate.py <export-dir | output_dir> --prompt "..." [--chat]
                                 [--max-new-tokens 128] [--temperature 0] [--prompt-file F]

Flags: `dsee-scale generate --help`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs without pip install

from dsee_scale.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["generate", *sys.argv[1:]])
