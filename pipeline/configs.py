"""Ready-made parameter sets (``configs/*.yaml``): partial params.yaml overlays, merged or turned into ``-S``.

An overlay has params.yaml's structure but only the keys it changes (``configs/mnist.yaml``,
``configs/cifar10.yaml``, ``configs/celeba64.yaml``: the anchors' hyperparameters for real data).

    python -m pipeline.configs apply configs/mnist.yaml [--params params.yaml] [--dry-run]
    python -m pipeline.configs show configs/mnist.yaml

``apply`` deep-merges the overlay into params.yaml (mappings merge key by key, lists and scalars are
replaced, new keys are appended), validates the result against every stage's schema
(:func:`pipeline.params.check_all`) and only then writes it atomically
(:func:`scoresde.atomic.atomic_write_text`: temp file in the same folder, fsync, ``os.replace``); it
prints the keys that changed. Comments and key order are kept when ``ruamel.yaml`` is importable (it
ships with DVC), otherwise key order only. An invalid overlay changes nothing and exits with status 2,
naming the field.

``show`` prints the equivalent ``dvc exp run -S key=value ...`` command (flattened dotted keys, values
in YAML flow style), for running the set as a DVC experiment without editing params.yaml.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from pipeline.params import PARAMS_FILE, ParamsError, check_all, flatten, read_params
from scoresde.atomic import atomic_write_text

__all__ = ["load_overlay", "deep_merge", "flatten", "changed_keys", "merge_text", "apply", "set_args",
           "dvc_command", "parse_set_args", "format_value", "ConfigError"]


class ConfigError(ValueError):
    """The overlay is unreadable, or the merged parameters are invalid."""


# ------------------------------------------------------------------------------------------ data
def load_overlay(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: overlay not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path} must hold a non-empty mapping at the top level")
    return data


def deep_merge(base: dict, overlay: dict) -> dict:
    """A new dict: ``overlay`` merged into ``base`` (mappings recursively; lists/scalars replaced)."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


_MISSING = object()


def changed_keys(before: dict, after: dict) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` for every leaf that differs (old is ``<absent>`` for new keys)."""
    a, b = flatten(before), flatten(after)
    out = []
    for key, new in b.items():
        old = a.get(key, _MISSING)
        if old is _MISSING or old != new or type(old) is not type(new):
            out.append((key, "<absent>" if old is _MISSING else old, new))
    return out


# --------------------------------------------------------------------------------- YAML writing
def merge_text(text: str, overlay: dict) -> str:
    """params.yaml text with ``overlay`` merged in; comments/order kept with ruamel.yaml when present."""
    try:
        from ruamel.yaml import YAML
        from ruamel.yaml.comments import CommentedMap, CommentedSeq
    except ImportError:  # pragma: no cover - ruamel ships with dvc
        return yaml.safe_dump(deep_merge(yaml.safe_load(text) or {}, overlay), sort_keys=False,
                              default_flow_style=None, width=120)

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096  # never wrap flow mappings such as `model: {...}`
    # plain floats as YAML 1.1 also reads them back as floats (4e-05 -> 4.0e-05; PyYAML needs the dot)
    rt.representer.add_representer(
        float, lambda r, v: r.represent_scalar("tag:yaml.org,2002:float", format_value(v)))
    doc = rt.load(text)
    if doc is None:
        doc = CommentedMap()

    def convert(value, like=None):
        if isinstance(value, dict):
            m = CommentedMap()
            for k, v in value.items():
                m[k] = convert(v)
            if like is not None and getattr(like, "fa", None) is not None and like.fa.flow_style():
                m.fa.set_flow_style()
            return m
        if isinstance(value, list):
            s = CommentedSeq([convert(v) for v in value])
            if like is None or (isinstance(like, CommentedSeq) and like.fa.flow_style()) or not isinstance(like, list):
                s.fa.set_flow_style()  # short lists read best inline, as in params.yaml
            return s
        return value

    def merge(node, over):
        for key, value in over.items():
            cur = node.get(key) if hasattr(node, "get") else None
            if isinstance(value, dict) and isinstance(cur, dict):
                merge(cur, value)
            else:
                node[key] = convert(value, cur)

    merge(doc, overlay)
    buf = io.StringIO()
    rt.dump(doc, buf)
    return buf.getvalue()


def apply(overlay_path: str | Path, params_file: str | Path = PARAMS_FILE, dvc_file: str | Path = "dvc.yaml",
          dry_run: bool = False) -> list[tuple[str, Any, Any]]:
    """Merge, validate, then (unless ``dry_run``) atomically write; returns the changed keys.

    Raises :class:`ConfigError` (message names the field) and leaves ``params_file`` untouched when the
    overlay or the merged result is invalid.
    """
    params_file = Path(params_file)
    overlay = load_overlay(overlay_path)
    try:
        before = read_params(params_file)
    except ParamsError as err:
        raise ConfigError(str(err)) from None
    text = merge_text(params_file.read_text(), overlay)
    merged = yaml.safe_load(text)
    if merged != deep_merge(before, overlay):  # the text merge must mean exactly the data merge
        raise ConfigError("internal error: the comment-preserving merge differs from the data merge")
    # validate the merged file as the stages will read it
    fd, tmp = tempfile.mkstemp(prefix=".params-check.", suffix=".yaml", dir=params_file.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        problems = check_all(tmp, dvc_file)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    if problems:
        raise ConfigError(f"{overlay_path} does not give valid parameters:\n  " + "\n  ".join(
            p.replace(tmp, str(params_file)) for p in problems))
    changes = changed_keys(before, merged)
    if not dry_run and changes:
        atomic_write_text(params_file, text)
    return changes


# ------------------------------------------------------------------------------------- dvc -S
def format_value(value: Any) -> str:
    """A value as YAML flow text that reads back identically (``4e-05`` -> ``4.0e-05``: YAML 1.1 needs the dot)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        r = repr(value)
        if "e" in r and "." not in r.split("e")[0]:
            mant, exp = r.split("e")
            r = f"{mant}.0e{exp}"
        return r
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        plain = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
        return plain[:-4].strip() if plain.endswith("\n...") else plain.removesuffix("...").strip()
    if isinstance(value, list):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot format {value!r}")


def set_args(overlay: dict) -> list[str]:
    """``["key.path=value", ...]`` for ``dvc exp run -S`` (one per leaf of the overlay)."""
    return [f"{k}={format_value(v)}" for k, v in flatten(overlay).items()]


def nest(flat: dict[str, Any]) -> dict:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``: the inverse of :func:`pipeline.params.flatten`."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = copy.deepcopy(value)
    return out


def parse_set_args(args: list[str]) -> dict:
    """Inverse of :func:`set_args` (how ``dvc exp run -S`` reads them: YAML values at dotted paths)."""
    return nest({key: yaml.safe_load(text) for key, _, text in (arg.partition("=") for arg in args)})


def dvc_command(overlay: dict, name: str | None = None) -> str:
    parts = ["dvc", "exp", "run"] + (["-n", name] if name else [])
    for arg in set_args(overlay):
        parts += ["-S", arg]
    return " ".join(shlex.quote(p) for p in parts)


# ----------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.configs", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("apply", help="merge an overlay into params.yaml (validated, atomic)")
    a.add_argument("overlay")
    a.add_argument("--params", default=PARAMS_FILE)
    a.add_argument("--dvc", default="dvc.yaml", help="dvc.yaml naming the stages whose schemas validate")
    a.add_argument("--dry-run", action="store_true", help="validate and print the changes, write nothing")
    s = sub.add_parser("show", help="print the equivalent `dvc exp run -S ...` command")
    s.add_argument("overlay")
    s.add_argument("--name", default=None, help="experiment name (dvc exp run -n)")
    args = p.parse_args(argv)
    try:
        if args.cmd == "show":
            overlay = load_overlay(args.overlay)
            print(dvc_command(overlay, args.name))
            return 0
        changes = apply(args.overlay, args.params, args.dvc, dry_run=args.dry_run)
    except ConfigError as err:
        print(f"[configs] {err}", file=sys.stderr)
        return 2
    verb = "would change" if args.dry_run else "changed"
    print(f"[configs] {args.overlay} -> {args.params}: {verb} {len(changes)} key(s)")
    for key, old, new in changes:
        print(f"  {key}: {format_value(old) if old != '<absent>' else old} -> {format_value(new)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
