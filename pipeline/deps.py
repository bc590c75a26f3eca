"""The repository code each DVC stage runs, derived from the code itself, against the deps dvc.yaml lists.

``dvc repro`` re-runs a stage when one of its deps changes, so every repository module a stage's command
imports — directly or transitively, imports inside functions included — must be a dep (the file, or a
folder that holds it). :func:`import_closure` follows the imports of a module through the AST (no code is
executed); :func:`check` compares each stage of dvc.yaml with its closure.

Left out on purpose: the stage harness and the logging it does (``pipeline.stage``, ``pipeline.tracking``,
``pipeline.env``) — they decide where results are logged, not what a stage computes — and package
``__init__`` files that hold only a docstring and constants.

    python -m pipeline.deps            # one line per stage with a missing or superfluous code dep; exit 1 if any
    python -m pipeline.deps --write    # rewrite the code deps of every stage in dvc.yaml from the closures
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGES = ("scoresde", "pipeline", "stages")
HARNESS = ("pipeline.stage", "pipeline.tracking", "pipeline.env")


def module_file(module: str, root: Path) -> Path | None:
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _trivial_init(path: Path) -> bool:
    """An ``__init__.py`` with only a docstring and constant assignments executes nothing that matters."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Constant):
            continue
        return False
    return True


def _executed_nodes(tree: ast.AST):
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` (imports for type checkers only)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def _imports(path: Path, module: str, root: Path) -> set[str]:
    """Repository modules imported anywhere in ``path`` (functions included)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _executed_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # `from pkg import mod` imports a module; `from mod import name` imports mod
            names = [f"{base}.{a.name}" if module_file(f"{base}.{a.name}", root) else base for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def import_closure(module: str, root: str | Path = ".") -> set[Path]:
    """Files (relative to ``root``) of every repository module ``module`` needs, itself included."""
    root = Path(root)
    seen: set[str] = set()
    files: set[Path] = set()
    todo = [module]
    while todo:
        mod = todo.pop()
        if mod in seen or mod in HARNESS:
            continue
        seen.add(mod)
        parts = mod.split(".")
        for i in range(1, len(parts)):  # importing a.b.c runs a/__init__.py and a/b/__init__.py
            init = module_file(".".join(parts[:i]), root)
            if init is not None and init.name == "__init__.py" and not _trivial_init(init):
                files.add(init.relative_to(root))
                todo.append(".".join(parts[:i]))
        path = module_file(mod, root)
        if path is None:
            raise ModuleNotFoundError(f"{mod} (imported by the stage code) has no file under {root}")
        if not (path.name == "__init__.py" and _trivial_init(path)):
            files.add(path.relative_to(root))
        todo.extend(_imports(path, mod, root))
    return files


def stage_commands(root: str | Path = ".") -> dict[str, tuple[str, list[str]]]:
    """{stage name as in dvc.yaml: (module of its ``python -m`` command, deps)} (foreach bodies once)."""
    import yaml

    stages = yaml.safe_load((Path(root) / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        parts = str(body["cmd"]).split()
        if "-m" in parts:
            out[name] = (parts[parts.index("-m") + 1], [str(d) for d in body.get("deps", [])])
    return out


def _covered(path: Path, deps: list[str]) -> bool:
    p = path.as_posix()
    return any(p == d.rstrip("/") or p.startswith(d.rstrip("/") + "/") for d in deps)


def check(root: str | Path = ".") -> dict[str, dict[str, list[str]]]:
    """{stage: {"missing": [...], "superfluous": [...]}} for stages whose code deps differ from their closure."""
    problems = {}
    for name, (module, deps) in stage_commands(root).items():
        closure = import_closure(module, root)
        missing = sorted(p.as_posix() for p in closure if not _covered(p, deps))
        code_deps = [d for d in deps if d.endswith(".py") or d.rstrip("/") in PACKAGES
                     or d.split("/")[0] in PACKAGES]
        extra = sorted(d for d in code_deps if not any(_covered(p, [d]) for p in closure))
        if missing or extra:
            problems[name] = {"missing": missing, "superfluous": extra}
    return problems


def write(root: str | Path = ".") -> None:
    """Replace the code deps (``*.py`` of the packages) of every stage in dvc.yaml by its closure: the stage
    module first, then pipeline/, then scoresde/; data deps and comments are kept, in place."""
    import re

    root = Path(root)
    commands = stage_commands(root)
    code = re.compile(r"^(\s+)- (%s)/\S+\.py\s*(#.*)?$" % "|".join(PACKAGES))
    lines, out, stage, i = (root / "dvc.yaml").read_text().split("\n"), [], None, 0
    while i < len(lines):
        line = lines[i]
        named = re.match(r"^  (\w+):", line)
        stage = named.group(1) if named else stage
        out.append(line)
        i += 1
        head = re.match(r"^(\s+)deps:\s*$", line)
        if not head or stage not in commands:
            continue
        indent, rest = head.group(1) + "  ", []
        while i < len(lines) and re.match(r"^\s+- ", lines[i]):
            (rest if not code.match(lines[i]) else []).append(lines[i])
            indent = re.match(r"^(\s+)- ", lines[i]).group(1)
            i += 1
        files = sorted(p.as_posix() for p in import_closure(commands[stage][0], root))
        files = sorted(files, key=lambda f: ("stages", "pipeline", "scoresde").index(f.split("/")[0]))
        out += [f"{indent}- {f}" for f in files] + rest
    (root / "dvc.yaml").write_text("\n".join(out))


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pipeline.deps", description=(
        "Check that every stage of dvc.yaml lists, as deps, the repository modules its command imports "
        "(transitively, derived from the code's AST); --write rewrites those code deps in dvc.yaml."))
    ap.add_argument("root", nargs="?", default=".", help="the repository root (default: .)")
    ap.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps instead of checking them")
    args = ap.parse_args(argv)
    if args.write:
        write(args.root)
    problems = check(args.root)
    for name, p in problems.items():
        print(f"{name}: missing {p['missing']} superfluous {p['superfluous']}")
    if not problems:
        print("every stage lists the repository code it imports")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
