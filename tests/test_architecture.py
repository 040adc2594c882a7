"""Architecture rules a tool checks rather than a reviewer (as DeepSpeed's check-torchdist hook):

- only dsee_scale/zero/ talks to the process group (torch.distributed, deepspeed.comm,
  deepspeed.init_distributed), so the device rule in zero/comm.py holds for every collective;
- only dsee_scale/zero/ and the checkpoint reader read ZeRO-3 parameter internals (ds_shape...);
- no sys.path manipulation outside the launchers (the package is installed);
- no import cycles between the package's sub-packages.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT

PACKAGE = ROOT / "dsee_scale"
ZERO = PACKAGE / "zero"
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
    "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "barrier",
    "init_process_group", "destroy_process_group", "init_distributed", "new_group", "send", "recv",
    "all_to_all", "scatter", "gather", "monitored_barrier",
}  # fmt: skip
ZERO_ATTRIBUTES = {"ds_shape", "ds_numel", "ds_id", "ds_tensor", "ds_status"}


def python_files(*roots: Path) -> list[Path]:
    return sorted(p for r in roots for p in r.rglob("*.py"))


def offences(path: Path) -> list[str]:
    """Where a file reaches the process group or ZeRO internals."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            names = [a.name for a in node.names]
            mods = [module] if module else names
            if any(m and (m.startswith("torch.distributed") or m.startswith("deepspeed.comm")) for m in mods):
                found.append(f"{where}: imports {mods}")
            if module == "torch" and "distributed" in names:
                found.append(f"{where}: imports torch.distributed")
        elif isinstance(node, ast.Attribute) and node.attr in COLLECTIVES:
            base = ast.unparse(node.value)
            if base in ("dist", "torch.distributed", "deepspeed", "deepspeed.comm"):
                found.append(f"{where}: calls {base}.{node.attr}")
        elif isinstance(node, ast.Attribute) and node.attr in ZERO_ATTRIBUTES:
            found.append(f"{where}: reads ZeRO-3 internal {node.attr}")
        elif isinstance(node, ast.Constant) and node.value in ZERO_ATTRIBUTES:
            found.append(f"{where}: reads ZeRO-3 internal {node.value!r}")
    return found


def test_only_zero_talks_to_the_process_group_or_reads_zero_internals():
    outside = [p for p in python_files(PACKAGE, ROOT / "launchers") if ZERO not in p.parents]
    problems = [o for p in outside for o in offences(p)]
    assert not problems, "\n".join(problems)
    # and the check itself finds what it looks for
    assert any("all_reduce" in o for o in offences(ZERO / "comm.py"))
    assert any("ds_shape" in o for o in offences(ZERO / "__init__.py"))


def test_no_sys_path_insert_outside_the_launchers():
    offenders = []
    for p in python_files(PACKAGE, ROOT / "bench", ROOT / "tests", ROOT / "scripts"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Attribute) and ast.unparse(node) in (
                "sys.path.insert",
                "sys.path.append",
            ):
                offenders.append(f"{p.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


def package_imports() -> dict[str, set[str]]:
    """Sub-package -> the sub-packages it imports (at module level or inside functions)."""

    def name_of(p: Path) -> str:
        parts = p.relative_to(ROOT).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    def unit(module: str) -> str:  # dsee_scale.training.trainer -> dsee_scale.training
        return ".".join(module.split(".")[:2])

    edges: dict[str, set[str]] = {}
    for p in python_files(PACKAGE):
        me = name_of(p)
        here = me.split(".") if p.name == "__init__.py" else me.split(".")[:-1]
        for node in ast.walk(ast.parse(p.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = ".".join(here[: len(here) - node.level + 1]) if node.level else ""
                module = ".".join(x for x in (base, node.module or "") if x)
                targets = [module] if node.module else [f"{module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t.startswith("dsee_scale.") and unit(t) != unit(me):
                    edges.setdefault(unit(me), set()).add(unit(t))
    return edges


def test_sub_packages_import_each_other_without_cycles():
    """The house reads top-down: launchers -> stages (training, pruning, export) -> building
    blocks (adapters, zero, checkpoint, data, models) -> config and errors. No sub-package
    imports one that (directly or not) imports it back, lazily inside a function or not."""
    edges = package_imports()

    def reach(a: str) -> set[str]:
        seen, todo = set(), [a]
        while todo:
            for b in edges.get(todo.pop(), ()):
                if b not in seen:
                    seen.add(b)
                    todo.append(b)
        return seen

    cycles = sorted({tuple(sorted((a, b))) for a in edges for b in reach(a) if a in reach(b) and a != b})
    assert not cycles, cycles
    assert "dsee_scale.zero" in edges["dsee_scale.adapters"]  # the check sees imports
    assert not reach("dsee_scale.zero") - {"dsee_scale.errors"}  # zero/ is a leaf
