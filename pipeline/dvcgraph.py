"""The DVC pipeline as DVC itself sees it: stages (foreach/matrix expanded) and their dependency edges.

The Prefect flow (:mod:`pipeline.flow`) never keeps a second, hand-written copy of the DAG: it asks
DVC's Python API (``dvc.repo.Repo(root).index``) for the stages of every ``dvc.yaml`` in the repository
and for the graph DVC builds from their ``deps``/``outs`` -- the same graph ``dvc dag`` draws and
``dvc repro`` walks. Stage names are DVC's *addressing* (``train@ve``, ``eval@vp-10`` for a matrix,
``sub/dvc.yaml:stage`` for a stage in another ``dvc.yaml``), so they can be passed back to any DVC
command (``dvc status train@ve``, ``dvc commit -f train@ve``).

Only stages with a command become tasks. Data sources (``.dvc`` files from ``dvc add``) and imports
have no command: they are left out, and any edge that went through one is kept transitively (in
practice they are always roots of the graph).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence


@dataclass(frozen=True)
class StageSpec:
    """One runnable DVC stage."""

    name: str                       # DVC addressing: "prepare", "train@ve", "sub/dvc.yaml:stage"
    cmd: tuple[str, ...]            # one or more shell-free command lines (DVC allows a list)
    wdir: str                       # absolute working directory of the command
    deps: tuple[str, ...]           # dependency paths, relative to the repository root
    outs: tuple[str, ...]           # output paths (outs, metrics, plots), relative to the root
    upstream: tuple[str, ...]       # names of the stages this one directly depends on
    frozen: bool = False
    always_changed: bool = False


@dataclass(frozen=True)
class Pipeline:
    """Stages in a topological order (every stage after all of its upstream stages)."""

    root: str
    stages: dict[str, StageSpec] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()   # stages without a command (data sources, imports), not run

    @property
    def order(self) -> list[str]:
        return list(self.stages)

    def edges(self) -> set[tuple[str, str]]:
        """``(upstream, downstream)`` pairs, the direction ``dvc dag`` draws its arrows."""
        return {(up, name) for name, spec in self.stages.items() for up in spec.upstream}

    def downstream(self, name: str) -> set[str]:
        """Every stage that (transitively) depends on ``name``."""
        children: dict[str, set[str]] = {n: set() for n in self.stages}
        for up, down in self.edges():
            children[up].add(down)
        seen: set[str] = set()
        todo = [name]
        while todo:
            for child in children.get(todo.pop(), ()):
                if child not in seen:
                    seen.add(child)
                    todo.append(child)
        return seen

    def __len__(self) -> int:
        return len(self.stages)


@contextlib.contextmanager
def working_directory(path: str | os.PathLike) -> Iterator[None]:
    """Temporarily ``chdir`` (DVC's API resolves stage addresses against the current directory)."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def find_root(path: str | os.PathLike = ".") -> str:
    """The root of the DVC repository containing ``path``."""
    from dvc.repo import Repo

    return str(Path(Repo.find_root(str(path))).resolve())


def _rel(path: str, root: str) -> str:
    try:
        return os.path.relpath(path, root)
    except ValueError:  # other drive (Windows)
        return path


def _cmd_list(cmd: str | Sequence[str] | None) -> tuple[str, ...]:
    if not cmd:
        return ()
    if isinstance(cmd, str):
        return (cmd,)
    return tuple(str(c) for c in cmd)


def load_pipeline(root: str | os.PathLike = ".", targets: Iterable[str] | None = None,
                  *, with_deps: bool = True) -> Pipeline:
    """Read the pipeline of the DVC repository at ``root`` through DVC's own index.

    ``targets`` are anything ``dvc repro`` accepts (``train@ve``, ``train`` for all its foreach items,
    ``dvc.yaml:noise``, ``sub/dvc.yaml``); with ``with_deps`` (the ``dvc repro`` behaviour) the
    stages they depend on are included too. ``None`` means every stage of the repository.
    """
    import networkx as nx
    from dvc.repo import Repo

    root = find_root(root)
    with working_directory(root), Repo(root) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        if targets:
            selected = set()
            for target in targets:
                collected = repo.stage.collect(target, with_deps=with_deps)
                if not collected:
                    raise ValueError(f"DVC target {target!r} matches no stage in {root}")
                selected.update(collected)
        else:
            selected = set(graph.nodes)

        sub = graph.subgraph(selected)
        runnable = {s for s in sub.nodes if s.cmd}

        def nearest_runnable(stage) -> set:
            """Runnable stages reachable from ``stage`` through non-runnable ones only."""
            found, todo, seen = set(), list(sub.successors(stage)), set()
            while todo:
                node = todo.pop()
                if node in seen:
                    continue
                seen.add(node)
                if node in runnable:
                    found.add(node)
                else:
                    todo.extend(sub.successors(node))
            return found

        # Reverse topological order of DVC's graph = dependencies first; ties broken by DVC's
        # own stage order (dvc.yaml order), so the flow submits stages in the order users read them.
        position = {stage: i for i, stage in enumerate(repo.index.stages)}
        order = list(nx.lexicographical_topological_sort(sub.reverse(copy=True),
                                                         key=lambda s: position.get(s, len(position))))
        stages: dict[str, StageSpec] = {}
        for stage in order:
            if stage not in runnable:
                continue
            stages[stage.addressing] = StageSpec(
                name=stage.addressing,
                cmd=_cmd_list(stage.cmd),
                wdir=str(Path(stage.wdir).resolve()),
                deps=tuple(_rel(str(d.fs_path), root) for d in stage.deps),
                outs=tuple(_rel(str(o.fs_path), root) for o in stage.outs),
                upstream=tuple(sorted(s.addressing for s in nearest_runnable(stage))),
                frozen=bool(stage.frozen),
                always_changed=bool(getattr(stage, "always_changed", False)),
            )
        skipped = tuple(sorted(s.addressing for s in sub.nodes if s not in runnable))
    return Pipeline(root=root, stages=stages, skipped=skipped)


def parse_dot_edges(dot: str) -> set[tuple[str, str]]:
    """Edges of ``dvc dag --dot`` output as ``(upstream, downstream)`` pairs (for cross-checks)."""
    edges = set()
    for line in dot.splitlines():
        line = line.strip().rstrip(";")
        if "->" in line:
            left, right = (part.strip().strip('"') for part in line.split("->", 1))
            edges.add((left, right))
    return edges
