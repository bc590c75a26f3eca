"""Reading a params file defensively: every malformed file is one :class:`ParamsError` naming the file.

:func:`read_yaml_mapping` is what :func:`pipeline.params.read_params` uses. It refuses, before any
stage does work, and each time with one line that says what is wrong and where:

- a file larger than :data:`MAX_BYTES` (1 MiB; the repository's params.yaml is ~10 KiB);
- binary content (a NUL byte) and text that is not UTF-8 (the offending byte, its line and column);
- YAML syntax errors and tab characters (YAML indents with spaces), with line and column;
- duplicated mapping keys, at the top level and nested: PyYAML silently keeps the last one, DVC's own
  YAML reader refuses the file; the message names the key path (``train.ve.lr``) and both lines;
- an empty file (nothing, only comments) and a top level that is not a mapping (a list, a scalar);
- structures nested too deeply for the parser (``[[[[…``), recursive aliases and non-scalar keys.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 1 << 20  # 1 MiB: a sane bound for a hand-edited params file
_MAX_DEPTH = 200     # deeper nesting than this is not a params file


def _err(path: str, message: str):
    from pipeline.params import ParamsError

    return ParamsError(path, message)


def _where(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown position"


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


class _Loader(yaml.SafeLoader):
    """SafeLoader whose documents are checked for duplicated keys before they are constructed."""


def _key_text(key: Any) -> str:
    return key if isinstance(key, str) else repr(key)


def _check_duplicates(loader: _Loader, node: yaml.Node, path: str, seen: set[int], depth: int, file: str,
                      ancestors: tuple[int, ...] = ()) -> None:
    if id(node) in ancestors:
        raise _err(path or "<file>", f"{file}: a recursive structure (an alias inside the node it refers to, "
                                     f"anchored at {_where(node.start_mark)})")
    if id(node) in seen:  # an alias to an already checked node (also keeps "billion laughs" linear)
        return
    seen.add(id(node))
    ancestors += (id(node),)
    if depth > _MAX_DEPTH:
        raise _err("<file>", f"{file}: nesting deeper than {_MAX_DEPTH} levels at {_where(node.start_mark)}")
    if isinstance(node, yaml.MappingNode):
        first: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys may be overridden
                _check_duplicates(loader, value_node, path, seen, depth + 1, file, ancestors)
                continue
            key = loader.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise _err("<file>", f"{file}: a mapping key that is not a scalar at {_where(key_node.start_mark)}"
                           ) from None
            sub = f"{path}.{_key_text(key)}" if path else _key_text(key)
            line = key_node.start_mark.line + 1
            if key in first:
                raise _err(sub, f"duplicate key in {file} at line {line} (first defined at line {first[key]}); "
                                f"YAML keeps only one of them, DVC refuses the file: remove one")
            first[key] = line
            _check_duplicates(loader, value_node, sub, seen, depth + 1, file, ancestors)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(loader, item, f"{path}[{i}]", seen, depth + 1, file, ancestors)


def parse_yaml_text(text: str, file: str) -> Any:
    """The YAML document in ``text`` with duplicate-key, syntax and tab errors as ParamsError (one line)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicates(loader, node, "", set(), 0, file)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        problem = _one_line(err.problem or err.context)
        if "\t" in problem or "'\\t'" in problem:
            raise _err("<file>", f"{file}: a tab character at {_where(mark)}: YAML indents with spaces, "
                                 f"replace the tab") from None
        context = ""
        if err.context and err.problem:
            start = err.context_mark
            started = f" started at line {start.line + 1}" if start is not None and mark is not None and \
                start.line != mark.line else ""
            context = f" ({_one_line(err.context)}{started})"
        raise _err("<file>", f"{file} is not valid YAML: {problem}{context} at {_where(mark)}") from None
    except yaml.YAMLError as err:
        raise _err("<file>", f"{file} is not valid YAML: {_one_line(str(err))}") from None
    except RecursionError:
        raise _err("<file>", f"{file}: nesting too deep for the YAML parser") from None
    finally:
        loader.dispose()


def decode(raw: bytes, file: str) -> str:
    """UTF-8 text of ``raw``, refusing binary content and other encodings with the offending position."""
    nul = raw.find(b"\x00")
    if nul >= 0:
        line = raw.count(b"\n", 0, nul) + 1
        raise _err("<file>", f"{file} is binary, not a YAML text file (NUL byte at offset {nul}, line {line})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise _err("<file>", f"{file} is not UTF-8 text (byte 0x{raw[err.start]:02x} at line {line}, "
                             f"column {column}); save it as UTF-8") from None
    return text.removeprefix("\ufeff")  # a UTF-8 byte order mark is harmless


def read_yaml_mapping(params_file: str | Path, max_bytes: int = MAX_BYTES) -> dict:
    """The top-level mapping of a params file, or a ParamsError naming the file and what is wrong."""
    path = Path(params_file)
    if not path.exists():
        raise _err("<file>", f"{path} not found (run from the repository root)")
    if not path.is_file():
        raise _err("<file>", f"{path} is not a regular file")
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise _err("<file>", f"{path} is {size} bytes, over the {max_bytes // 1024} KiB limit of a params file "
                                 f"({max_bytes} bytes): is it the right file?")
        with open(path, "rb") as fh:
            raw = fh.read(max_bytes + 1)
    except OSError as err:
        raise _err("<file>", f"{path} cannot be read: {err.strerror or err}") from None
    if len(raw) > max_bytes:  # grew while being read
        raise _err("<file>", f"{path} is over the {max_bytes // 1024} KiB limit of a params file")
    data = parse_yaml_text(decode(raw, str(path)), str(path))
    if data is None:
        raise _err("<file>", f"{path} is empty (no YAML document, or null): expected a mapping of params sections "
                             f"(experiment, seed, ...)")
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"a {type(data).__name__} scalar"
        raise _err("<file>", f"{path} must hold a mapping of params sections at the top level, got {kind}")
    return data
