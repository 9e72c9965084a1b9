"""Read YAML text safely: bounded in size, encoding, nesting and alias expansion.

A config is read from text nobody vetted, so the reader refuses, each in one line (a
:class:`~pearl_edu.errors.ConfigError` naming the file), what would otherwise hang or
exhaust the memory: text over :data:`MAX_CONFIG_BYTES` or not UTF-8, nesting deeper than
:data:`MAX_DEPTH`, more than :data:`MAX_EXPANDED_NODES` values or :data:`MAX_EXPANDED_CHARS`
characters once every alias (``*name``) is expanded (counted on the node graph, before any
Python object is built), recursive aliases, numbers longer than :data:`MAX_NUMBER_LENGTH`
characters, and keys that are not strings. It gives plain data; what the keys mean is
`pearl_edu.config`'s business.
"""

from __future__ import annotations

import reprlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pearl_edu.errors import ConfigError

# Bounds on what the reader accepts, so that hostile YAML ends in a one-line error at once
# instead of a hang or an exhausted memory. A real merge config is a few kilobytes, nested
# fewer than 10 levels, with a few hundred values.
MAX_CONFIG_BYTES = 1 << 20  # the YAML text: 1 MiB
MAX_DEPTH = 64  # levels of nesting, counted with every alias (*name) expanded
MAX_EXPANDED_NODES = 100_000  # keys, values and list items, with every alias expanded
MAX_EXPANDED_CHARS = 4 << 20  # characters of all keys and strings, likewise
MAX_NUMBER_LENGTH = 100  # characters of one number in the YAML (PyYAML's ints are exact)


def read_text(path: Path, where: str) -> str:
    """The text of a config file: at most MAX_CONFIG_BYTES bytes of UTF-8."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{where}: cannot read the config: {os_reason(err)}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(_too_large(where))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{where}: not UTF-8 text (byte 0x{data[err.start]:02x} at byte offset "
            f"{err.start}); save the config as UTF-8"
        ) from None


def check_size(text: str, where: str) -> None:
    """Refuse YAML text of more than MAX_CONFIG_BYTES bytes of UTF-8."""
    if len(text) > MAX_CONFIG_BYTES or len(_utf8(text)) > MAX_CONFIG_BYTES:
        raise ConfigError(_too_large(where))


def _utf8(text: str) -> bytes:
    """``text`` as UTF-8 bytes (lone surrogates kept, for YAML's reader to refuse)."""
    return text.encode("utf-8", "surrogatepass")


def _too_large(where: str) -> str:
    return (
        f"{where}: larger than {MAX_CONFIG_BYTES // (1 << 20)} MiB; a merge config is a few "
        "kilobytes of YAML"
    )


def os_reason(err: OSError) -> str:
    """The operating system's reason for ``err``, on one line ("Permission denied")."""
    return " ".join(str(err.strerror or err).split())


def shown_path(source: str | Path) -> str:
    """A file name as error messages show it: on one line, and shortened when very long."""
    text = str(source)
    if text.isprintable() and len(text) <= 200:
        return text
    shown = repr(text) if not text.isprintable() else text
    if len(shown) > 200:
        shown = f"{shown[:100]}...{shown[-40:]} (a name of {len(text)} characters)"
    return shown


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with bounds: nesting depth while composing, number length.

    Composing is recursive (two Python frames per level), so a document nested thousands
    of levels deep would otherwise end in a RecursionError.
    """

    def __init__(self, stream: str, where: str) -> None:
        super().__init__(stream)
        self.where = where
        self.depth = 0
        self.nodes = 0

    def fetch_flow_collection_start(self, token_class: Any) -> None:
        # Refused while scanning too: a run of "[" or "{" would otherwise be scanned up to
        # 1024 characters ahead (for a possible key) before composing sees its depth.
        if self.flow_level >= MAX_DEPTH:
            raise ConfigError(
                f"{self.where}: nested deeper than {MAX_DEPTH} levels at line {self.line + 1}; "
                "a merge config needs fewer than 10"
            )
        super().fetch_flow_collection_start(token_class)

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.depth >= MAX_DEPTH:
            line = self.peek_event().start_mark.line + 1
            raise ConfigError(
                f"{self.where}: nested deeper than {MAX_DEPTH} levels at line {line}; "
                "a merge config needs fewer than 10"
            )
        self.nodes += 1
        if self.nodes > MAX_EXPANDED_NODES:
            line = self.peek_event().start_mark.line + 1
            raise ConfigError(
                f"{self.where}: more than {MAX_EXPANDED_NODES} values (at line {line}); "
                "a merge config has a few hundred"
            )
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        if (
            isinstance(node, yaml.ScalarNode)
            and node.tag in (_INT_TAG, _FLOAT_TAG)
            and len(node.value) > MAX_NUMBER_LENGTH
        ):
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"a number of {len(node.value)} characters (at most {MAX_NUMBER_LENGTH})",
                node.start_mark,
            )
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as err:  # such as a date 2024-13-45
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {short(node.value)}: {err}", node.start_mark
            ) from None


_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"


def load_yaml(text: str, where: str) -> Any:
    """The YAML document of ``text``, within the reader's bounds."""
    loader = _BoundedLoader(text, where)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: malformed YAML{_yaml_location(err)}") from None
    finally:
        loader.dispose()


def _check_expansion(root: yaml.Node, where: str) -> None:
    """Refuse a node graph that, with every alias expanded, is too big, too deep or cyclic.

    YAML aliases (``*name``) let a few lines stand for billions of values (an "alias
    bomb"), and an alias inside its own anchor for an endless one. Each node's expanded
    size is computed once (memoised) with an explicit stack, so this takes time in
    proportion to the text, however large the expansion would be.
    """
    # id(node) -> (values, characters, depth) of the node with its aliases expanded
    sizes: dict[int, tuple[int, int, int]] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            open_nodes.discard(key)
            parts = [sizes[id(child)] for child in _children(node)]
            count = 1 + sum(part[0] for part in parts)
            chars = sum(part[1] for part in parts)
            depth = 1 + max((part[2] for part in parts), default=0)
            sizes[key] = (count, chars, depth)
            _check_expanded_size(node, count, chars, depth, where)
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise ConfigError(
                f"{where}: an alias at line {node.start_mark.line + 1} refers to a value that "
                "contains it (a recursive alias), which has no end when expanded"
            )
        if isinstance(node, yaml.ScalarNode):
            sizes[key] = (1, len(node.value), 1)
            continue
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node))


def _children(node: yaml.Node) -> list[yaml.Node]:
    """The nodes inside a sequence or mapping node (keys and values)."""
    if isinstance(node, yaml.MappingNode):
        return [item for pair in node.value for item in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expanded_size(node: yaml.Node, count: int, chars: int, depth: int, where: str) -> None:
    """Refuse a node whose expansion is deeper, has more values or more text than allowed."""
    line = node.start_mark.line + 1
    if depth > MAX_DEPTH:
        raise ConfigError(
            f"{where}: nested deeper than {MAX_DEPTH} levels at line {line} once its aliases "
            "(*name) are expanded; a merge config needs fewer than 10"
        )
    if count > MAX_EXPANDED_NODES:
        raise ConfigError(
            f"{where}: the value at line {line} would hold more than {MAX_EXPANDED_NODES} "
            "values once its aliases (*name) are expanded; a merge config has a few hundred"
        )
    if chars > MAX_EXPANDED_CHARS:
        raise ConfigError(
            f"{where}: the value at line {line} would hold more than "
            f"{MAX_EXPANDED_CHARS >> 20} MiB of text once its aliases (*name) are expanded"
        )


def _yaml_location(err: yaml.YAMLError) -> str:
    """' at line L, column C: problem' for a YAML parse error, on one line."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{where}: {' '.join(str(problem).split())}"


# ---------------------------------------------------------------------------------------
# The whole tree: bounded, every key a string


def check_tree(raw: Mapping[str, Any], where: str) -> None:
    """Every mapping key anywhere must be a string, and the tree must be bounded.

    The same bounds as the YAML reader (depth, values, characters), counted with shared
    values counted at every place they appear, for mappings given to
    `pearl_edu.config.parse_config` directly. Walks with an explicit stack; a path is built
    only for an error message.
    """
    count, chars = 0, 0
    # (value, path as a linked (parent, segment) pair, depth)
    stack: list[tuple[Any, Any, int]] = [(raw, None, 1)]
    while stack:
        value, path, depth = stack.pop()
        count += 1
        if depth > MAX_DEPTH:
            raise ConfigError(
                f"{where}: {_path_text(path)}: nested deeper than {MAX_DEPTH} levels; "
                "a merge config needs fewer than 10"
            )
        if count > MAX_EXPANDED_NODES:
            raise ConfigError(
                f"{where}: more than {MAX_EXPANDED_NODES} values (aliases counted at every "
                "place they appear); a merge config has a few hundred"
            )
        if isinstance(value, Mapping):
            for key, item in value.items():
                if not isinstance(key, str):
                    inside = _path_text(path)
                    raise ConfigError(
                        f"{where}: {inside + ': ' if inside else ''}the key {short(key)} is "
                        f"{_kind_of(key)}, not a string; every key must be a string "
                        "(put it in quotes)"
                    )
                chars += len(key)
                segment = f".{key_text(key)}" if path else key_text(key)
                stack.append((item, (path, segment), depth + 1))
        elif isinstance(value, list | tuple):
            stack.extend((item, (path, f"[{i}]"), depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str):
            chars += len(value)
        if chars > MAX_EXPANDED_CHARS:
            raise ConfigError(
                f"{where}: more than {MAX_EXPANDED_CHARS >> 20} MiB of text (aliases counted "
                "at every place they appear)"
            )


def _path_text(path: Any) -> str:
    """``slices[0].parameters`` from a linked (parent, segment) path; '' for the top."""
    segments = []
    while path is not None:
        path, segment = path
        segments.append(segment)
    return "".join(reversed(segments))


def _kind_of(value: Any) -> str:
    """'an integer', 'a boolean (YAML reads ...)': what YAML made of an unquoted key."""
    if isinstance(value, bool):
        return "a boolean (YAML reads true, false, yes, no, on and off as one)"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if value is None:
        return "null"
    return f"a {type(value).__name__}"


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 60
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 2, 6, 6, 4


def short(value: Any) -> str:
    """``repr(value)`` shortened for a one-line message (long strings and lists cut)."""
    return _REPR.repr(value)


def key_text(key: Any) -> str:
    """A key as messages show it: as written when short and printable, else its repr."""
    if isinstance(key, str) and key.isprintable() and 0 < len(key) <= 60:
        return key
    return short(key)
