"""The one reader of YAML specs and ``--set`` overrides: bounded, strict, one error line per problem.

Every training-run spec and job spec is read here (``read_tree``) and every ``--set
dotted.key=value`` applied here (``apply_overrides``). What a hostile or malformed spec can
do is bounded before anything is built from it:

- size: a spec file holds at most ``MAX_SPEC_BYTES``; a ``--set`` value at most ``MAX_VALUE_CHARS``;
- text: a file with NUL bytes or that is not UTF-8 is refused as binary;
- nesting: at most ``MAX_DEPTH`` levels of mappings and lists;
- aliases: ``*alias`` may be used, but the tree with every alias expanded holds at most
  ``MAX_NODES`` values (a "billion laughs" spec is refused while it is still small), and an
  alias may not contain itself;
- duplicate keys: a key given twice in one mapping is refused, naming both lines;
- numbers: ``.inf``, ``-.inf`` and ``.nan`` are refused wherever they appear.

Errors are :class:`~memel.errors.ConfigError` on one line; values quoted in them are cut to
``memel.errors.MAX_SHOWN`` characters.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from memel.errors import ConfigError, shown

#: Largest spec file read (bytes); real specs are a few kilobytes.
MAX_SPEC_BYTES = 1 << 20
#: Deepest nesting of mappings and lists in a spec or a ``--set`` value.
MAX_DEPTH = 32
#: Most values (mappings, lists and scalars) a spec may hold with its aliases expanded.
MAX_NODES = 20_000
#: Longest ``--set`` value (characters).
MAX_VALUE_CHARS = 64 * 1024


class _Refused(yaml.YAMLError):
    """A bound the loader enforces; ``problem`` and ``mark`` say what and where."""

    def __init__(self, problem: str, mark: yaml.Mark | None) -> None:
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with a depth cap, duplicate-key refusal and bounded aliases."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:  # type: ignore[override]
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _Refused(f"nested deeper than {MAX_DEPTH} levels; a spec is a few levels of sections", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:  # type: ignore[override]
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: PyYAML's own error says so
                break
            line = key_node.start_mark.line + 1
            if first is not None:
                raise _Refused(
                    f"key {shown(key)} is given twice (lines {first} and {line}); keep one of them", key_node.start_mark
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: yaml.Node) -> int:
    """Values in the tree under ``root`` with every alias expanded; refuses recursion and the bound."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise _Refused(
                "an alias refers to a node that contains it (a recursive spec); write the values out", node.start_mark
            )
        open_nodes.add(key)
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_NODES:
                raise _Refused(
                    f"holds more than {MAX_NODES} values once its aliases (*name) are expanded; "
                    "write the values out or use fewer aliases",
                    child.start_mark,
                )
        open_nodes.discard(key)
        sizes[key] = total
        return total

    size(root)
    return sizes[id(root)]


def _parse(text: str) -> Any:
    """The value YAML ``text`` holds, within the loader's bounds (``yaml.YAMLError`` otherwise)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        try:
            return loader.construct_document(node)
        except ValueError as error:  # e.g. an integer of more digits than Python converts
            reason = " ".join(str(error).split(":")[0].split())[:120]
            raise _Refused(f"a value cannot be read ({reason}); shorten it", None) from None
    finally:
        loader.dispose()


def _where(error: yaml.YAMLError) -> str:
    """``line L, column C: problem`` from a YAML error, on one line."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if isinstance(error, yaml.reader.ReaderError):
        character = chr(error.character) if isinstance(error.character, int) else error.character
        problem = f"character {character!r} at position {error.position} is not allowed in YAML; remove it"
    at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{at}{' '.join(str(problem).split())}"


def non_finite_at(tree: Any, path: str = "") -> str | None:
    """The dotted path of the first ``inf`` or ``nan`` float in ``tree``, if any."""
    if isinstance(tree, float) and not math.isfinite(tree):
        return path or "(top level)"
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = ((f"[{index}]", value) for index, value in enumerate(tree))
    else:
        return None
    for key, value in items:
        key_text = str(key)
        found = non_finite_at(
            value, key_text if not path else f"{path}{key_text}" if key_text.startswith("[") else f"{path}.{key_text}"
        )
        if found is not None:
            return found
    return None


def _refuse_non_finite(tree: Any, owner: str) -> None:
    found = non_finite_at(tree)
    if found is not None:
        raise ConfigError(f"{owner}.{found}: not a finite number (.inf and .nan are refused); give a finite value")


def read_text(path: str | Path, owner: str, example: str) -> str:
    """The text of spec file ``path``, refused when absent, too large or binary."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(
            f"{owner}: no such file {shown(str(file))}; give the path of a YAML {owner} file, e.g. {example}"
        )
    size = file.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise ConfigError(
            f"{owner}: {file} is {size:,} bytes, more than the {MAX_SPEC_BYTES:,} a spec may hold; give a YAML spec file"
        )
    try:
        data = file.read_bytes()
    except OSError as error:
        raise ConfigError(f"{owner}: {file} cannot be read ({error.strerror}); check its permissions") from None
    if b"\x00" in data:
        raise ConfigError(
            f"{owner}: {file} is a binary file (it holds NUL bytes), not a YAML spec; give a YAML text file"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{owner}: {file} is not UTF-8 text (byte {error.start}); give a YAML text file saved as UTF-8"
        ) from None


def read_tree(path: str | Path, owner: str, example: str, empty: str | None = None) -> dict[str, Any]:
    """The mapping of sections spec file ``path`` holds, within every bound of this module.

    ``owner`` starts every error (``spec``, ``job``); an empty file is an empty tree unless
    ``empty`` says why it may not be.
    """
    file = Path(path)
    text = read_text(file, owner, example)
    try:
        loaded = _parse(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{owner}: {file} is not valid YAML: {_where(error)}") from None
    except RecursionError:
        raise ConfigError(f"{owner}: {file} is nested too deeply to read; a spec is a few levels of sections") from None
    if loaded is None:
        if empty is not None:
            raise ConfigError(f"{owner}: {file} is empty; {empty}")
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{owner}: {file} must hold a mapping of sections, got {type(loaded).__name__}")
    bad_key = next((key for key in loaded if not isinstance(key, str)), None)
    if bad_key is not None:
        raise ConfigError(
            f"{owner}: {file}: section name {shown(bad_key)} is not a word; sections are names like train or model"
        )
    _refuse_non_finite(loaded, owner)
    return loaded


def parse_value(dotted: str, raw: str) -> Any:
    """The value of ``--set dotted=raw``, read as YAML within the same bounds as a spec file."""
    if len(raw) > MAX_VALUE_CHARS:
        raise ConfigError(
            f"--set {dotted}: the value is {len(raw):,} characters, more than {MAX_VALUE_CHARS:,}; put it in the spec file"
        )
    try:
        value = _parse(raw)
    except yaml.YAMLError as error:
        raise ConfigError(
            f"--set {dotted}: {shown(raw)} is not valid YAML ({_where(error)}); "
            f"give a YAML value, quoting a string: --set {dotted}='\"text\"'"
        ) from None
    except RecursionError:
        raise ConfigError(f"--set {dotted}: the value is nested too deeply; give a plain value") from None
    found = non_finite_at(value)
    if found is not None:
        where = (
            dotted if found == "(top level)" else f"{dotted}{found}" if found.startswith("[") else f"{dotted}.{found}"
        )
        raise ConfigError(f"--set {where}: not a finite number (.inf and .nan are refused); give a finite value")
    return value


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``dotted`` ``a.b.c``, creating sections that are absent."""
    keys = dotted.split(".")
    if not all(key.strip() for key in keys):
        raise ConfigError(f"--set {shown(dotted)}: empty key; expected dotted.key=value, e.g. train.steps=20")
    node = tree
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            where = ".".join(keys[: depth + 1])
            raise ConfigError(
                f"--set {dotted}: {key!r} is not a section ({where} holds {shown(child)}); set {where} itself"
            )
        node = child
    node[keys[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """``tree`` with every ``dotted.key=value`` of ``overrides`` applied in order (values are YAML)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {shown(item)}: expected dotted.key=value, e.g. train.steps=20")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key.count(".") >= MAX_DEPTH:
            raise ConfigError(f"--set {shown(key)}: more than {MAX_DEPTH} levels of keys; name an existing field")
        set_dotted(tree, key, parse_value(key, raw))
    return tree
