"""Read a mergekit YAML config into a validated, typed description of the merge.

This is the first step of a merge (config -> plan -> read -> math -> write). Every mistake
in the YAML is reported here, as a one-line :class:`~pearl_edu.errors.ConfigError` naming
the file and the key, before a single weight is read.

The meaning is mergekit's:

- ``slices:`` lists output slices; each has ``sources`` (``model`` + half-open
  ``layer_range: [a, b]``) and optionally its own ``base_model`` and ``parameters``.
- ``models:`` (instead of ``slices:``) means one slice over all layers of every model; it
  becomes a single slice whose sources have ``layer_range=None``.
- ``parameters`` (top level, per slice, per source/model) map a name such as ``t`` to a
  number, a gradient (a list of numbers spread over the layers of a slice) or an ordered
  list of ``{filter, value}`` entries, the first whose filter is a substring of the tensor
  name winning, an entry without ``filter`` matching everything.
- Per-model parameters (``weight``, ``density``) are looked up for each input: first under
  its own entry in ``sources``/``models``, then the slice's ``parameters``, then the
  top-level ones. Shared parameters (``t``, ``normalize``, ``lambda``) ignore model entries.
- In the ``models:`` form, a ``base_model`` that is not listed is added as the last model.
- ``random_seed`` (or ``seed``), default 0, seeds the random methods (DARE).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from pearl_edu.errors import ConfigError
from pearl_edu.methods import METHODS, known_methods
from pearl_edu.recipes import recipe_path

# The one table of dtype names in configs and config.json: mergekit's floating names
# (mergekit 0.1.5's `dtype_from_name`; `torch.` prefixed forms are accepted too) and the
# torch dtypes they mean. (mergekit also reads int64, which no merge can compute in.)
DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
# A filter of "*" matches every tensor in mergekit, like an entry without a filter.
MATCH_ALL = "*"
# Parameters that later methods take as booleans (stored as 1.0 / 0.0).
BOOLEAN_PARAMETERS = frozenset(
    {
        "normalize",
        "int8_mask",
        "rescale",
        "lambda_normalize",
        "nuslerp_flatten",
        "nuslerp_row_wise",
        "normalize_weights",
        "filter_wise",
    }
)

TOP_LEVEL_KEYS = frozenset(
    {
        "slices",
        "models",
        "merge_method",
        "base_model",
        "parameters",
        "dtype",
        "out_dtype",
        # Tokenizer and template options: validated as mergekit 0.1.5 does, then left to
        # the writer.
        "tokenizer_source",
        "tokenizer",
        "chat_template",
        "name",
        # The seed of random methods (DARE); mergekit takes it on the command line instead.
        "random_seed",
        "seed",
    }
)
SEED_KEYS = ("random_seed", "seed")
# Parameters that are fractions of a tensor's entries.
FRACTION_PARAMETERS = frozenset({"density"})
SLICE_KEYS = frozenset({"sources", "base_model", "parameters"})
SOURCE_KEYS = frozenset({"model", "layer_range", "parameters"})
MODEL_KEYS = frozenset({"model", "parameters"})
FILTER_KEYS = frozenset({"filter", "value"})
# mergekit 0.1.5's TokenizerConfig and TokenEmbeddingConfig (mergekit/tokenizer/config.py).
TOKENIZER_KEYS = frozenset({"source", "tokens", "pad_to_multiple_of"})
TOKEN_KEYS = frozenset({"source", "force"})
TOKEN_SOURCE_KEYS = {  # by kind: ModelTokenEmbedding and ZeroEmbedding
    "model_token": frozenset({"kind", "model", "token_id", "token"}),
    "zero": frozenset({"kind"}),
}
# The tokenizer sources that are not a model: mergekit's Literal["union"] and ["base"].
TOKENIZER_SOURCES = ("union", "base")
# The chat templates shipped with mergekit 0.1.5 (mergekit/_data/chat_templates/*.jinja);
# "auto" takes the most common template of the input models.
CHAT_TEMPLATE_NAMES = ("alpaca", "chatml", "exaone", "llama3", "mistral")
# mergekit's _set_chat_template takes any other text for Jinja when it is at least this
# long and has a "{"; shorter text, or text without "{", is refused.
MIN_JINJA_LENGTH = 20

# Bounds on what the reader accepts, so that hostile YAML ends in a one-line error at once
# instead of a hang or an exhausted memory. A real merge config is a few kilobytes, nested
# fewer than 10 levels, with a few hundred values.
MAX_CONFIG_BYTES = 1 << 20  # the YAML text: 1 MiB
MAX_DEPTH = 64  # levels of nesting, counted with every alias (*name) expanded
MAX_EXPANDED_NODES = 100_000  # keys, values and list items, with every alias expanded
MAX_EXPANDED_CHARS = 4 << 20  # characters of all keys and strings, likewise
MAX_NUMBER_LENGTH = 100  # characters of one number in the YAML (PyYAML's ints are exact)
MAX_MODEL_REF_LENGTH = 4096  # a model reference: a repo id or a path (PATH_MAX)
MAX_LAYERS = 10_000  # layer indices, and output layers in all (the largest models have ~100)

Number = float
Gradient = tuple[float, ...]


@dataclass(frozen=True)
class FilterRule:
    """One ``{filter, value}`` entry: a value (number or gradient) for matching tensors.

    ``filter=None`` matches every tensor (an entry without ``filter``, or ``"*"``).
    """

    filter: str | None
    value: Number | Gradient

    def matches(self, tensor_name: str) -> bool:
        """Whether this rule applies to ``tensor_name`` (case-sensitive substring)."""
        return self.filter is None or (bool(tensor_name) and self.filter in tensor_name)


@dataclass(frozen=True)
class ParamSpec:
    """A parameter as written in the YAML: a number, a gradient, or filter rules.

    All three forms are stored as an ordered tuple of rules: a number or a gradient is a
    single rule that matches every tensor. ``form`` remembers which form was written.
    """

    rules: tuple[FilterRule, ...]
    form: str  # "scalar", "gradient" or "filters"

    def rule_for(self, tensor_name: str) -> FilterRule | None:
        """The first rule whose filter matches ``tensor_name``, or None."""
        return next((rule for rule in self.rules if rule.matches(tensor_name)), None)

    def filters(self) -> list[str | None]:
        """The filters in order (None for a catch-all)."""
        return [rule.filter for rule in self.rules]


@dataclass(frozen=True)
class SourceConfig:
    """One input of a slice: a model and the half-open range of its layers to use.

    ``layer_range=None`` means all layers of the model (the ``models:`` form).
    """

    model: str
    layer_range: tuple[int, int] | None
    parameters: dict[str, ParamSpec] = field(default_factory=dict)

    @property
    def num_layers(self) -> int | None:
        """How many layers this source contributes, when the YAML says so."""
        return None if self.layer_range is None else self.layer_range[1] - self.layer_range[0]


@dataclass(frozen=True)
class SliceConfig:
    """One output slice: its sources and the base model and parameters it overrides."""

    sources: tuple[SourceConfig, ...]
    base_model: str | None = None
    parameters: dict[str, ParamSpec] = field(default_factory=dict)

    def models(self) -> list[str]:
        """The models of this slice, in order."""
        return [source.model for source in self.sources]


@dataclass(frozen=True)
class TokenSource:
    """Where the embedding of an added token comes from (mergekit's ``tokens.X.source``).

    ``kind`` is ``"model"`` (the same token in ``model``), ``"model_token"`` (token
    ``token_id`` or text ``token`` of ``model``) or ``"zero"`` (a zero vector).
    """

    kind: str
    model: str | None = None
    token_id: int | None = None
    token: str | None = None


@dataclass(frozen=True)
class TokenEmbedding:
    """One entry of ``tokenizer.tokens``: its source and whether to ``force`` it."""

    source: TokenSource | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerConfig:
    """The ``tokenizer:`` mapping (mergekit 0.1.5's TokenizerConfig), validated only.

    ``source`` is ``"union"`` (the default), ``"base"`` or a model reference.
    """

    source: str = "union"
    tokens: dict[str, TokenEmbedding] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None


@dataclass(frozen=True)
class MergeConfig:
    """A validated merge config (see the module docstring for its meaning).

    ``source`` is where it came from (a file path, a recipe, or ``"<string>"``), used in
    error messages; ``raw`` is the YAML as parsed, kept for the model card (bounded by the
    reader's limits: :data:`MAX_CONFIG_BYTES`, :data:`MAX_DEPTH`, :data:`MAX_EXPANDED_NODES`).
    The tokenizer options (``tokenizer_source``, ``tokenizer``, ``chat_template``) and
    ``name`` are validated as mergekit does; pearl_edu does not merge tokenizers.
    """

    merge_method: str
    slices: tuple[SliceConfig, ...]
    base_model: str | None
    parameters: dict[str, ParamSpec]
    dtype: str | None
    out_dtype: str | None
    source: str
    raw: dict
    random_seed: int = 0
    tokenizer_source: str | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    name: str | None = None

    def models(self) -> list[str]:
        """Distinct model references, in order of first appearance."""
        refs = [source.model for sl in self.slices for source in sl.sources]
        refs += [sl.base_model for sl in self.slices if sl.base_model]
        if self.base_model:
            refs.append(self.base_model)
        return list(dict.fromkeys(refs))

    def slice_base(self, slice_index: int) -> str | None:
        """The base model of a slice: its own ``base_model``, else the top-level one."""
        return self.slices[slice_index].base_model or self.base_model

    def canonical(self) -> str:
        """The validated merge as compact JSON with sorted keys: what determines the bits.

        The method, the slices (sources, layer ranges, parameters), the base model, the
        parameters, dtype, out_dtype, the random seed and the tokenizer options, as
        validated; not ``name``, comments, key order or how a value was spelled
        (``0.5`` or ``5e-1``). Built from the validated fields, never from ``raw``, so it
        is as bounded as the reader's limits make them.
        """
        data = {
            "merge_method": self.merge_method,
            "slices": [
                {
                    "sources": [
                        {
                            "model": source.model,
                            "layer_range": source.layer_range,
                            "parameters": _params_data(source.parameters),
                        }
                        for source in sl.sources
                    ],
                    "base_model": sl.base_model,
                    "parameters": _params_data(sl.parameters),
                }
                for sl in self.slices
            ],
            "base_model": self.base_model,
            "parameters": _params_data(self.parameters),
            "dtype": self.dtype,
            "out_dtype": self.out_dtype,
            "random_seed": self.random_seed,
            "tokenizer_source": self.tokenizer_source,
            "tokenizer": None if self.tokenizer is None else dataclasses.asdict(self.tokenizer),
            "chat_template": self.chat_template,
        }
        return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)

    def config_hash(self) -> str:
        """A stable hex digest of what the merge computes: the SHA-256 of :meth:`canonical`.

        Two configs with the same hash produce the same model from the same inputs, so a
        resumed merge can check it is continuing the same work.
        """
        return hashlib.sha256(self.canonical().encode("utf-8")).hexdigest()


def _params_data(parameters: Mapping[str, ParamSpec]) -> dict[str, list[list[Any]]]:
    """Parameters as JSON-ready data: each name's ordered [filter, value] rules."""
    return {
        name: [[rule.filter, rule.value] for rule in spec.rules]
        for name, spec in parameters.items()
    }


def load_config(source: str | Path) -> MergeConfig:
    """Read and validate a merge config from a YAML file, a YAML string or a recipe name.

    ``source`` is a path to a YAML file, YAML text (any string containing a newline), or
    the name of a recipe shipped with the package, such as ``"pearl-7b-slerp"``.

    The reader is bounded: at most :data:`MAX_CONFIG_BYTES` of UTF-8 text, nested at most
    :data:`MAX_DEPTH` levels, and at most :data:`MAX_EXPANDED_NODES` values once every
    alias is expanded (counted on the YAML's node graph before any Python object is
    built), so that hostile input is a one-line `ConfigError`, never a hang.
    """
    text, where = _read_source(source)
    raw = _load_yaml(text, where)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys (merge_method, slices, ...)")
    return parse_config(raw, where)


def parse_config(raw: Mapping[str, Any], where: str = "<config>") -> MergeConfig:
    """Validate an already-parsed YAML mapping (see :func:`load_config`)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys (merge_method, slices, ...)")
    _check_tree(raw, where)
    _reject_unknown_keys(raw, TOP_LEVEL_KEYS, where, "")
    method = _merge_method(raw, where)
    base_model = _optional_model_ref(raw, "base_model", where, "base_model")
    slices = _slices(raw, where)
    if "models" in raw:
        slices = (_with_base_model(slices[0], base_model),)
    tokenizer_source, tokenizer = _tokenizer_options(raw, where)
    config = MergeConfig(
        merge_method=method,
        slices=slices,
        base_model=base_model,
        parameters=_parameters(raw.get("parameters"), where, "parameters"),
        dtype=_dtype(raw, "dtype", where),
        out_dtype=_dtype(raw, "out_dtype", where),
        source=where,
        raw=dict(raw),
        random_seed=_random_seed(raw, where),
        tokenizer_source=tokenizer_source,
        tokenizer=tokenizer,
        chat_template=_chat_template(raw, where),
        name=_name(raw, where),
    )
    _check_method_requirements(config)
    return config


# ---------------------------------------------------------------------------------------
# Where the YAML comes from


def _read_source(source: str | Path) -> tuple[str, str]:
    """The YAML text of ``source`` and the name to use for it in error messages."""
    if isinstance(source, str) and "\n" in source:
        where = "<string>"
        if len(source) > MAX_CONFIG_BYTES or len(_utf8(source)) > MAX_CONFIG_BYTES:
            raise ConfigError(_too_large(where))
        return source, where
    path = Path(source)
    where = _shown_path(source)
    try:
        is_file = path.is_file()
        is_dir = not is_file and path.is_dir()
    except OSError as err:  # a name too long, a loop of links, ...
        raise ConfigError(f"{where}: cannot read the config: {_os_reason(err)}") from None
    if is_file:
        return _read_text(path, where), where
    if isinstance(source, str) and not source.endswith((".yml", ".yaml")) and "/" not in source:
        try:
            recipe = recipe_path(source)
        except FileNotFoundError as err:
            if is_dir:
                raise ConfigError(f"{where}: a folder, not a YAML config file") from None
            raise ConfigError(f"{where}: not a file, and {err}") from None
        except (OSError, ValueError) as err:  # a name no file system takes
            raise ConfigError(f"{where}: not a file, and not a shipped recipe ({err})") from None
        return _read_text(recipe, str(recipe)), str(recipe)
    if is_dir:
        raise ConfigError(f"{where}: a folder, not a YAML config file")
    raise ConfigError(f"{where}: no such file (expected a mergekit YAML config)")


def _read_text(path: Path, where: str) -> str:
    """The text of a config file: at most MAX_CONFIG_BYTES bytes of UTF-8."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{where}: cannot read the config: {_os_reason(err)}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(_too_large(where))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{where}: not UTF-8 text (byte 0x{data[err.start]:02x} at byte offset "
            f"{err.start}); save the config as UTF-8"
        ) from None


def _utf8(text: str) -> bytes:
    """``text`` as UTF-8 bytes (lone surrogates kept, for YAML's reader to refuse)."""
    return text.encode("utf-8", "surrogatepass")


def _too_large(where: str) -> str:
    return (
        f"{where}: larger than {MAX_CONFIG_BYTES // (1 << 20)} MiB; a merge config is a few "
        "kilobytes of YAML"
    )


def _os_reason(err: OSError) -> str:
    """The operating system's reason for ``err``, on one line ("Permission denied")."""
    return " ".join(str(err.strerror or err).split())


def _shown_path(source: str | Path) -> str:
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
                None, None, f"cannot read {_short(node.value)}: {err}", node.start_mark
            ) from None


_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"


def _load_yaml(text: str, where: str) -> Any:
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


def _check_tree(raw: Mapping[str, Any], where: str) -> None:
    """Every mapping key anywhere must be a string, and the tree must be bounded.

    The same bounds as the YAML reader (depth, values, characters), counted with shared
    values counted at every place they appear, for mappings given to :func:`parse_config`
    directly. Walks with an explicit stack; a path is built only for an error message.
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
                        f"{where}: {inside + ': ' if inside else ''}the key {_short(key)} is "
                        f"{_kind_of(key)}, not a string; every key must be a string "
                        "(put it in quotes)"
                    )
                chars += len(key)
                segment = f".{_key_text(key)}" if path else _key_text(key)
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


def _short(value: Any) -> str:
    """``repr(value)`` shortened for a one-line message (long strings and lists cut)."""
    return _REPR.repr(value)


def _key_text(key: Any) -> str:
    """A key as messages show it: as written when short and printable, else its repr."""
    if isinstance(key, str) and key.isprintable() and 0 < len(key) <= 60:
        return key
    return _short(key)


# ---------------------------------------------------------------------------------------
# Keys


def _merge_method(raw: Mapping[str, Any], where: str) -> str:
    """The ``merge_method``, which must be one that :mod:`pearl_edu.methods` implements."""
    method = raw.get("merge_method")
    if method is None:
        raise ConfigError(f"{where}: merge_method: missing; known: {', '.join(known_methods())}")
    if not isinstance(method, str) or method not in METHODS:
        raise ConfigError(
            f"{where}: merge_method: unknown method {_short(method)}; "
            f"known: {', '.join(known_methods())}"
        )
    return method


def _slices(raw: Mapping[str, Any], where: str) -> tuple[SliceConfig, ...]:
    """The output slices, from either the ``slices:`` or the ``models:`` form."""
    has_slices, has_models = "slices" in raw, "models" in raw
    if has_slices == has_models:
        raise ConfigError(f"{where}: expected exactly one of 'slices' or 'models'")
    if has_models:
        return (_models_form(raw["models"], where),)
    slices = raw["slices"]
    if not isinstance(slices, list) or not slices:
        raise ConfigError(f"{where}: slices: expected a non-empty list of slices")
    parsed = tuple(_slice(entry, where, f"slices[{i}]") for i, entry in enumerate(slices))
    total = sum(sl.sources[0].num_layers or 0 for sl in parsed)
    if total > MAX_LAYERS:
        raise ConfigError(
            f"{where}: slices: {total} output layers in all, more than {MAX_LAYERS}; no model "
            "has so many"
        )
    return parsed


def _models_form(models: Any, where: str) -> SliceConfig:
    """``models: [{model, parameters}, ...]``: one slice over all layers of each model."""
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{where}: models: expected a non-empty list of {{model: ...}} entries")
    sources = []
    for i, entry in enumerate(models):
        key = f"models[{i}]"
        if isinstance(entry, str):  # mergekit also accepts a bare model reference
            entry = {"model": entry}
        _require_mapping(entry, where, key)
        _reject_unknown_keys(entry, MODEL_KEYS, where, key)
        sources.append(
            SourceConfig(
                model=_model_ref(entry, "model", where, f"{key}.model"),
                layer_range=None,
                parameters=_parameters(entry.get("parameters"), where, f"{key}.parameters"),
            )
        )
    return SliceConfig(sources=tuple(sources))


def _with_base_model(models_slice: SliceConfig, base_model: str | None) -> SliceConfig:
    """The ``models:`` slice with the base model added last when it is not listed (mergekit)."""
    if base_model is None or base_model in models_slice.models():
        return models_slice
    base = SourceConfig(model=base_model, layer_range=None)
    return dataclasses.replace(models_slice, sources=(*models_slice.sources, base))


def _slice(entry: Any, where: str, key: str) -> SliceConfig:
    """One entry of ``slices:``, with its layer ranges checked."""
    _require_mapping(entry, where, key)
    _reject_unknown_keys(entry, SLICE_KEYS, where, key)
    sources_raw = entry.get("sources")
    if not isinstance(sources_raw, list) or not sources_raw:
        raise ConfigError(f"{where}: {key}.sources: expected a non-empty list of sources")
    sources = tuple(_source(src, where, f"{key}.sources[{j}]") for j, src in enumerate(sources_raw))
    lengths = [source.num_layers for source in sources]
    if len(set(lengths)) > 1:
        ranges = ", ".join(f"{s.model} {list(s.layer_range or ())}" for s in sources)
        raise ConfigError(
            f"{where}: {key}.sources: every source of a slice must span the same number "
            f"of layers; got {lengths} ({ranges})"
        )
    return SliceConfig(
        sources=sources,
        base_model=_optional_model_ref(entry, "base_model", where, f"{key}.base_model"),
        parameters=_parameters(entry.get("parameters"), where, f"{key}.parameters"),
    )


def _source(entry: Any, where: str, key: str) -> SourceConfig:
    """One source of a slice: ``{model, layer_range: [a, b], parameters}``."""
    _require_mapping(entry, where, key)
    _reject_unknown_keys(entry, SOURCE_KEYS, where, key)
    return SourceConfig(
        model=_model_ref(entry, "model", where, f"{key}.model"),
        layer_range=_layer_range(entry.get("layer_range"), where, f"{key}.layer_range"),
        parameters=_parameters(entry.get("parameters"), where, f"{key}.parameters"),
    )


def _layer_range(value: Any, where: str, key: str) -> tuple[int, int]:
    """A half-open ``[start, end]`` with ``0 <= start < end``."""
    if value is None:
        raise ConfigError(f"{where}: {key}: missing; expected [start, end] (half-open)")
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise ConfigError(
            f"{where}: {key}: expected two integers [start, end], got {_short(value)}"
        )
    start, end = value
    if start < 0 or end < 0:
        raise ConfigError(f"{where}: {key}: layer indices must not be negative, got {value}")
    if start >= end:
        raise ConfigError(
            f"{where}: {key}: expected start < end (half-open range), got {value}; "
            "did you reverse it?"
        )
    if end > MAX_LAYERS:
        raise ConfigError(
            f"{where}: {key}: layer {end} is beyond {MAX_LAYERS}; no model has so many layers"
        )
    return (start, end)


def _model_ref(entry: Mapping[str, Any], name: str, where: str, key: str) -> str:
    """A model reference (HF repo id or local folder), which must be a non-empty string."""
    value = entry.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"{where}: {key}: expected a model (repo id or folder), got {_short(value)}"
        )
    if not value.isprintable() or len(value) > MAX_MODEL_REF_LENGTH:
        raise ConfigError(
            f"{where}: {key}: expected a model (repo id or folder) on one line, of at most "
            f"{MAX_MODEL_REF_LENGTH} characters, got {_short(value)}"
        )
    return value


def _optional_model_ref(entry: Mapping[str, Any], name: str, where: str, key: str) -> str | None:
    """Like :func:`_model_ref`, but the key may be absent."""
    return None if entry.get(name) is None else _model_ref(entry, name, where, key)


def torch_dtype(value: Any, *, where: str, key: str) -> torch.dtype:
    """The torch dtype of a dtype name as mergekit spells it (``bfloat16``, ``torch.float16``).

    Anything else is a `ConfigError` naming ``where`` (the config file) and ``key``.
    """
    plain = value.removeprefix("torch.") if isinstance(value, str) else value
    dtype = DTYPES.get(plain) if isinstance(plain, str) else None
    if dtype is None:
        raise ConfigError(
            f"{where}: {key}: unknown dtype {_short(value)}; known: {', '.join(DTYPES)}"
        )
    return dtype


def _dtype(raw: Mapping[str, Any], name: str, where: str) -> str | None:
    """A dtype name as mergekit spells it (``bfloat16``, ``torch.float16`` ...), or None."""
    value = raw.get(name)
    if value is None:
        return None
    return DTYPE_NAMES[torch_dtype(value, where=where, key=name)]


def _random_seed(raw: Mapping[str, Any], where: str) -> int:
    """The seed of random methods: ``random_seed`` or ``seed`` (an integer), default 0."""
    given = [key for key in SEED_KEYS if raw.get(key) is not None]
    if len(given) > 1:
        raise ConfigError(f"{where}: seed: give either random_seed or seed, not both")
    if not given:
        return 0
    value = raw[given[0]]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{where}: {given[0]}: expected an integer, got {_short(value)}")
    return value


# ---------------------------------------------------------------------------------------
# Tokenizer, chat template and name (validated as mergekit 0.1.5 reads them; not applied)


def _tokenizer_options(
    raw: Mapping[str, Any], where: str
) -> tuple[str | None, TokenizerConfig | None]:
    """``tokenizer_source`` and ``tokenizer``, at most one of them (as in mergekit)."""
    source = raw.get("tokenizer_source")
    tokenizer = raw.get("tokenizer")
    if source is not None and tokenizer is not None:
        raise ConfigError(
            f"{where}: tokenizer_source: give either tokenizer_source or tokenizer, not both "
            "(mergekit refuses both; put the source in tokenizer.source)"
        )
    if source is not None:
        source = _tokenizer_source(source, where, "tokenizer_source")
    if tokenizer is not None:
        tokenizer = _tokenizer(tokenizer, where)
    return source, tokenizer


def _tokenizer_source(value: Any, where: str, key: str) -> str:
    """``union``, ``base`` or a model reference (mergekit's Literal or ModelReference)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"{where}: {key}: expected {' or '.join(TOKENIZER_SOURCES)} or a model (repo id or "
            f"folder), got {_short(value)}"
        )
    return _model_ref({key: value}, key, where, key)


def _tokenizer(value: Any, where: str) -> TokenizerConfig:
    """The ``tokenizer:`` mapping: ``source``, ``tokens`` and ``pad_to_multiple_of``."""
    _require_mapping(value, where, "tokenizer")
    _reject_unknown_keys(value, TOKENIZER_KEYS, where, "tokenizer")
    source = value.get("source")
    source = "union" if source is None else _tokenizer_source(source, where, "tokenizer.source")
    tokens_raw = value.get("tokens")
    if tokens_raw is not None:
        _require_mapping(tokens_raw, where, "tokenizer.tokens")
    tokens = {
        token: _token_embedding(token, entry, where, f"tokenizer.tokens.{_key_text(token)}")
        for token, entry in (tokens_raw or {}).items()
    }
    pad = value.get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
        raise ConfigError(
            f"{where}: tokenizer.pad_to_multiple_of: expected a positive integer (such as "
            f"64), got {_short(pad)}"
        )
    return TokenizerConfig(source=source, tokens=tokens, pad_to_multiple_of=pad)


def _token_embedding(token: str, entry: Any, where: str, key: str) -> TokenEmbedding:
    """One ``tokens`` entry: ``{source, force}`` (mergekit's TokenEmbeddingConfig)."""
    if not token:
        raise ConfigError(f"{where}: {key}: expected a non-empty token")
    _require_mapping(entry, where, key)
    _reject_unknown_keys(entry, TOKEN_KEYS, where, key)
    force = entry.get("force", False)
    if not isinstance(force, bool):
        raise ConfigError(f"{where}: {key}.force: expected true or false, got {_short(force)}")
    source = entry.get("source")
    if source is not None:
        source = _token_source(source, where, f"{key}.source")
    return TokenEmbedding(source=source, force=force)


def _token_source(value: Any, where: str, key: str) -> TokenSource:
    """A model (the same token there), ``{kind: model_token, ...}`` or ``{kind: zero}``."""
    if isinstance(value, str):
        return TokenSource(kind="model", model=_model_ref({key: value}, key, where, key))
    kinds = " or ".join(TOKEN_SOURCE_KEYS)
    if not isinstance(value, dict) or value.get("kind") not in TOKEN_SOURCE_KEYS:
        got = value.get("kind") if isinstance(value, dict) else value
        raise ConfigError(
            f"{where}: {key}: expected a model, or a mapping with kind {kinds}, got {_short(got)}"
        )
    kind = value["kind"]
    _reject_unknown_keys(value, TOKEN_SOURCE_KEYS[kind], where, key)
    if kind == "zero":
        return TokenSource(kind="zero")
    model = _model_ref(value, "model", where, f"{key}.model")
    token_id, token = value.get("token_id"), value.get("token")
    if (token_id is None) == (token is None):
        raise ConfigError(f"{where}: {key}: give either token_id or token (one of them)")
    if token_id is not None and (
        not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0
    ):
        raise ConfigError(
            f"{where}: {key}.token_id: expected a token number (0 or more), got {_short(token_id)}"
        )
    if token is not None and (not isinstance(token, str) or not token):
        raise ConfigError(f"{where}: {key}.token: expected a non-empty string, got {_short(token)}")
    return TokenSource(kind="model_token", model=model, token_id=token_id, token=token)


def _chat_template(raw: Mapping[str, Any], where: str) -> str | None:
    """``chat_template``: ``auto``, a template mergekit ships, or Jinja text.

    mergekit 0.1.5 checks it when it writes the tokenizer, at the end of a merge; an empty
    one means none.
    """
    value = raw.get("chat_template")
    if value is None or value == "":
        return None
    names = ", ".join(CHAT_TEMPLATE_NAMES)
    if not isinstance(value, str):
        raise ConfigError(
            f"{where}: chat_template: expected auto, a template name ({names}) or Jinja "
            f"text, got {_short(value)}"
        )
    if (
        value != "auto"
        and value not in CHAT_TEMPLATE_NAMES
        and (len(value) < MIN_JINJA_LENGTH or "{" not in value)
    ):
        raise ConfigError(
            f"{where}: chat_template: {_short(value)} is neither auto, a template name "
            f"({names}) nor Jinja text (at least {MIN_JINJA_LENGTH} characters, with "
            "{{ ... }} or {% ... %})"
        )
    return value


def _name(raw: Mapping[str, Any], where: str) -> str | None:
    """``name``: a label for the merged model, a string (it does not change the weights)."""
    value = raw.get("name")
    if value is not None and not isinstance(value, str):
        raise ConfigError(
            f"{where}: name: expected a string, got {_short(value)}; put it in quotes"
        )
    return value


# ---------------------------------------------------------------------------------------
# Parameters


def _parameters(value: Any, where: str, key: str) -> dict[str, ParamSpec]:
    """A ``parameters:`` mapping, each entry parsed into a :class:`ParamSpec`."""
    if value is None:
        return {}
    _require_mapping(value, where, key)
    return {
        name: _param_spec(name, spec, where, f"{key}.{_key_text(name)}")
        for name, spec in value.items()
    }


def _param_spec(name: str, value: Any, where: str, key: str) -> ParamSpec:
    """One parameter: a number, a gradient list, or a list of ``{filter, value}`` entries."""
    _check_parameter_name(name, where, key)
    if isinstance(value, dict):  # a single {filter, value} entry
        value = [value]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        rules = tuple(_filter_rule(name, v, where, f"{key}[{i}]") for i, v in enumerate(value))
        return ParamSpec(rules=rules, form="filters")
    parsed = _value(name, value, where, key)
    form = "gradient" if isinstance(parsed, tuple) else "scalar"
    return ParamSpec(rules=(FilterRule(filter=None, value=parsed),), form=form)


def _check_parameter_name(name: str, where: str, key: str) -> None:
    """Catch a parameter that no merge method takes (a typo such as ``nuslerp_flaten``).

    mergekit ignores it, and merges as if it were not there. A parameter of another method
    (``t`` in a TIES config) is left alone, as mergekit leaves it.
    """
    known = sorted({p for m in METHODS.values() for p in (*m.parameters, *m.input_parameters)})
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {_short(close[0])}?" if close else f"known: {', '.join(known)}"
        raise ConfigError(f"{where}: {key}: unknown parameter; {hint}")


def _filter_rule(name: str, entry: dict, where: str, key: str) -> FilterRule:
    """One ``{filter, value}`` entry; no filter (or ``"*"``) matches every tensor."""
    _reject_unknown_keys(entry, FILTER_KEYS, where, key)
    if "value" not in entry:
        raise ConfigError(f"{where}: {key}: missing 'value' (a number or a list of numbers)")
    flt = entry.get("filter")
    if flt is not None and (not isinstance(flt, str) or not flt):
        raise ConfigError(f"{where}: {key}.filter: expected a non-empty string, got {_short(flt)}")
    value = _value(name, entry["value"], where, f"{key}.value")
    return FilterRule(filter=None if flt in (None, MATCH_ALL) else flt, value=value)


def _value(name: str, value: Any, where: str, key: str) -> Number | Gradient:
    """A number, or a gradient (a non-empty list of numbers)."""
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{where}: {key}: expected a number or a non-empty list of numbers")
        return tuple(_number(name, v, where, f"{key}[{i}]") for i, v in enumerate(value))
    return _number(name, value, where, key)


def _number(name: str, value: Any, where: str, key: str) -> float:
    """A finite number; booleans only for the parameters that are flags."""
    if isinstance(value, bool):
        if name in BOOLEAN_PARAMETERS:
            return float(value)
        raise ConfigError(f"{where}: {key}: expected a number, got {_short(value)}")
    number = _finite_number(value, where, key)
    if name in BOOLEAN_PARAMETERS and number not in (0.0, 1.0):
        raise ConfigError(f"{where}: {key}: expected true or false, got {_short(value)}")
    if name in FRACTION_PARAMETERS and not 0.0 <= number <= 1.0:
        raise ConfigError(
            f"{where}: {key}: expected a fraction of entries to keep, from 0 to 1, got {_short(value)}"
        )
    return number


def _finite_number(value: Any, where: str, key: str) -> float:
    """A finite int or float (or a string that reads as one, as YAML gives ``1e-3``)."""
    if isinstance(value, str):  # YAML reads 1e-3 as a string; mergekit accepts it
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}: {key}: expected a number, got {_short(value)}") from None
    if (
        not isinstance(value, int | float)
        or value != value
        or value in (float("inf"), -float("inf"))
    ):
        raise ConfigError(f"{where}: {key}: expected a finite number, got {_short(value)}")
    return float(value)


# ---------------------------------------------------------------------------------------
# What the merge method asks of the config


def _check_method_requirements(config: MergeConfig) -> None:
    """Check model counts, the base model and the required parameters, slice by slice."""
    method = METHODS[config.merge_method]
    where, name = config.source, config.merge_method
    for i, sl in enumerate(config.slices):
        key = f"slices[{i}]" if "slices" in config.raw else "models"
        count = len(sl.sources)
        if count < method.min_models or (method.max_models and count > method.max_models):
            expected = _count_words(method.min_models, method.max_models)
            added = (
                f", counting base_model {config.base_model}, which is added because it is "
                "not listed"
                if key == "models" and _base_was_added(config)
                else ""
            )
            raise ConfigError(f"{where}: {key}: {name} needs {expected}; got {count}{added}")
        if method.needs_base or (method.optional_base and config.slice_base(i) is not None):
            _check_base(config, i, key)
        _check_non_base_count(config, i, key)
        for param in method.required_parameters():
            if param not in sl.parameters and param not in config.parameters:
                raise ConfigError(
                    f"{where}: parameters.{param}: missing; {name} needs it "
                    f"(for example 'parameters: {{{param}: 0.5}}')"
                )
        _check_input_parameters(config, i, key)


def _check_non_base_count(config: MergeConfig, slice_index: int, key: str) -> None:
    """How many models besides the base, for methods that count them (nuslerp: exactly 2)."""
    method = METHODS[config.merge_method]
    low, high = method.min_non_base, method.max_non_base
    models = config.slices[slice_index].models()
    count = len(models) - (config.slice_base(slice_index) in models)
    if count < low or (high is not None and count > high):
        raise ConfigError(
            f"{config.source}: {key}: {config.merge_method} needs {_count_words(low, high)} "
            f"besides the base model; got {count}"
        )


def _base_was_added(config: MergeConfig) -> bool:
    """Whether the ``models:`` list leaves out ``base_model`` (so the base was added)."""
    listed = [e if isinstance(e, str) else e.get("model") for e in config.raw.get("models", [])]
    return config.base_model is not None and config.base_model not in listed


def _check_input_parameters(config: MergeConfig, slice_index: int, key: str) -> None:
    """Every input that takes per-model parameters must be given the required ones."""
    method = METHODS[config.merge_method]
    sl = config.slices[slice_index]
    base = config.slice_base(slice_index)
    for j, source in enumerate(sl.sources):
        if source.model == base and not method.base_has_input_parameters:
            continue
        for param in method.required_input_parameters():
            scopes = (source.parameters, sl.parameters, config.parameters)
            if not any(param in scope for scope in scopes):
                where_key = f"{key}[{j}]" if key == "models" else f"{key}.sources[{j}]"
                raise ConfigError(
                    f"{config.source}: {where_key}.parameters.{param}: missing for "
                    f"{source.model}; {config.merge_method} needs a {param} for each model "
                    f"(for example 'parameters: {{{param}: 0.5}}')"
                )


def _check_base(config: MergeConfig, slice_index: int, key: str) -> None:
    """The slice's base model must exist and be one of its sources."""
    where, name = config.source, config.merge_method
    base = config.slice_base(slice_index)
    models = config.slices[slice_index].models()
    if base is None:
        raise ConfigError(
            f"{where}: base_model: missing; {name} needs one of {models} as base_model"
            + (" (t = 0)" if name == "slerp" else "")
        )
    if base not in models:
        raise ConfigError(
            f"{where}: base_model: {_short(base)} is not among the models of {key} ({', '.join(models)})"
        )


def _count_words(low: int, high: int | None) -> str:
    """'exactly 2 models', 'at least 2 models' or '2 to 4 models'."""
    if high == low:
        return f"exactly {low} model{'s' if low != 1 else ''}"
    if high is None:
        return f"at least {low} model{'s' if low != 1 else ''}"
    return f"{low} to {high} models"


# ---------------------------------------------------------------------------------------
# Small checks


def _require_mapping(value: Any, where: str, key: str) -> None:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key}: expected a mapping, got {type(value).__name__}")


def _reject_unknown_keys(
    entry: Mapping[str, Any], known: frozenset[str], where: str, key: str
) -> None:
    """Catch typos such as ``parameter:`` that mergekit would silently ignore."""
    unknown = [k for k in entry if k not in known]
    if unknown:
        prefix = f"{key}." if key else ""
        raise ConfigError(
            f"{where}: {prefix}{_key_text(unknown[0])}: unknown key; expected one of "
            f"{', '.join(sorted(known))}"
        )
