"""Many short CLI runs for one interpreter start: run as `python tests/forked_cli.py` with a JSON
list of {"argv": [...], "env": {...}} on stdin; prints a JSON list of {"returncode", "stdout",
"stderr"}.

torch, DeepSpeed, transformers and dsee_scale are imported once (seconds per process on a small
machine); every run is then a forked child with its own process state, exactly as
`python launchers/train.py <argv>` would be after its imports: the CLI's main, its error wrapper,
its exit code. Used by the bad-input tests, whose runs stop within a second of starting.
"""

import json
import os
import sys
import tempfile
import traceback

import deepspeed  # noqa: F401  (imported before the fork: the children share it)
import transformers  # noqa: F401

from dsee_scale.cli import main


def run_one(argv: list[str], env: dict[str, str]) -> dict:
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: the launcher's main with this argv
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            os.environ.update(env)
            code = 0
            try:
                main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, int | None):
                    print(e.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return {"returncode": os.waitstatus_to_exitcode(status), "stdout": out.read(), "stderr": err.read()}


if __name__ == "__main__":
    cases = json.load(sys.stdin)
    results = [run_one(c["argv"], c.get("env", {})) for c in cases]
    sys.stdout.write(json.dumps(results))
