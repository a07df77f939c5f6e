"""Outliners for code and config files, read from tree-sitter syntax trees.

``OUTLINERS`` maps each language name that ``detect_language`` produces to an outliner
(see ``outline.py``): the document's top-level units in order — definitions with their
members or statements as children, the imports block, the module docstring, statement
groups — or, for config and data files, their entries, tables, stages, rules and
statements. Every named node type the tables below do not know becomes an anonymous
"statements" unit, so a grammar change degrades the outline instead of breaking it.

Grammars load on first use; each thread gets its own parsers (a ``tree_sitter.Parser`` is
not safe to share). A tree with a syntax error raises ``Fallback("parse-error")``: the
outline of a broken file cannot be trusted, and windows cut it well enough. An outliner
raises nothing else on any text.
"""

from __future__ import annotations

import bisect
import importlib
import importlib.metadata
import logging
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial

import tree_sitter
from tree_sitter import Node

from retriever.ingest.chunking.outline import Fallback, Outliner, Unit

__all__ = ["GRAMMAR_VERSIONS", "OUTLINERS"]

log = logging.getLogger(__name__)

# language -> (module, function returning the grammar, distribution)
_GRAMMARS: dict[str, tuple[str, str, str]] = {
    "python": ("tree_sitter_python", "language", "tree-sitter-python"),
    "javascript": ("tree_sitter_javascript", "language", "tree-sitter-javascript"),
    "typescript": ("tree_sitter_typescript", "language_typescript", "tree-sitter-typescript"),
    "tsx": ("tree_sitter_typescript", "language_tsx", "tree-sitter-typescript"),
    "go": ("tree_sitter_go", "language", "tree-sitter-go"),
    "rust": ("tree_sitter_rust", "language", "tree-sitter-rust"),
    "java": ("tree_sitter_java", "language", "tree-sitter-java"),
    "c": ("tree_sitter_c", "language", "tree-sitter-c"),
    "cpp": ("tree_sitter_cpp", "language", "tree-sitter-cpp"),
    "csharp": ("tree_sitter_c_sharp", "language", "tree-sitter-c-sharp"),
    "ruby": ("tree_sitter_ruby", "language", "tree-sitter-ruby"),
    "php": ("tree_sitter_php", "language_php", "tree-sitter-php"),
    "kotlin": ("tree_sitter_kotlin", "language", "tree-sitter-kotlin"),
    "bash": ("tree_sitter_bash", "language", "tree-sitter-bash"),
    "yaml": ("tree_sitter_yaml", "language", "tree-sitter-yaml"),
    "toml": ("tree_sitter_toml", "language", "tree-sitter-toml"),
    "json": ("tree_sitter_json", "language", "tree-sitter-json"),
    "dockerfile": ("tree_sitter_dockerfile", "language", "tree-sitter-dockerfile"),
    "make": ("tree_sitter_make", "language", "tree-sitter-make"),
    "sql": ("tree_sitter_sql", "language", "tree-sitter-sql"),
}

# Nesting followed when listing children (the packer follows at most 24 levels anyway);
# it also bounds recursion on pathological input.
MAX_DEPTH = 20
# Levels searched below a statement for the blocks it holds (a callback's body inside a
# call's arguments is 4 levels down: statement > call > arguments > function > block).
SEARCH_DEPTH = 5
MAX_NAME = 100
MAX_SIGNATURE = 200

_COMMENTS = frozenset({"comment", "line_comment", "block_comment", "marginalia"})
# Fields holding a block's head rather than its statements (``if cond;``, ``#ifdef NAME``,
# ``case PATTERN)``, ``extern "C"``).
_HEAD_FIELDS = frozenset({"condition", "name", "value"})
# Tokens after a unit on its line that belong to it: ``x = 1;`` and ``f(a),``.
_TAIL_TOKENS = frozenset({";", ","})
_CONTAINERS = frozenset({"class", "interface", "struct", "enum", "trait", "impl", "module",
                         "namespace"})
_FUNCTIONS = frozenset({"function", "method"})


# -- grammars and parsers ---------------------------------------------------------------------
_lock = threading.Lock()
_languages: dict[str, tree_sitter.Language | None] = {}  # None: the grammar cannot load
_local = threading.local()


def _language(name: str) -> tree_sitter.Language:
    """The grammar, loaded once per process; Fallback("no-grammar") when it cannot load (a
    missing or incompatible package), so that such documents still get windows."""
    if name not in _languages:
        with _lock:
            if name not in _languages:
                _languages[name] = _load(name)
    lang = _languages[name]
    if lang is None:
        raise Fallback("no-grammar")
    return lang


def _load(name: str) -> tree_sitter.Language | None:
    module, function, _ = _GRAMMARS[name]
    try:
        pointer = getattr(importlib.import_module(module), function)()
        if not isinstance(pointer, int):
            return tree_sitter.Language(pointer)
        with warnings.catch_warnings():
            # tree-sitter-dockerfile 0.2 still returns an int pointer (deprecated).
            warnings.simplefilter("ignore", DeprecationWarning)
            return tree_sitter.Language(pointer)
    except (ImportError, AttributeError, TypeError, ValueError):
        log.exception("cannot load the tree-sitter grammar for %s", name)
        return None


def _parser(name: str) -> tree_sitter.Parser:
    parsers: dict[str, tree_sitter.Parser] | None = getattr(_local, "parsers", None)
    if parsers is None:
        parsers = _local.parsers = {}
    parser = parsers.get(name)
    if parser is None:
        parser = parsers[name] = tree_sitter.Parser(_language(name))
    return parser


class _Versions(Mapping[str, str]):
    """language -> "tree-sitter-python 0.25.0", read from package metadata on first use."""

    def __init__(self) -> None:
        self._cache: dict[str, str] | None = None

    def _all(self) -> dict[str, str]:
        if self._cache is None:
            out = {}
            for lang, (_, _, dist) in _GRAMMARS.items():
                try:
                    version = importlib.metadata.version(dist)
                except importlib.metadata.PackageNotFoundError:
                    version = "unknown"
                out[lang] = f"{dist} {version}"
            self._cache = out
        return self._cache

    def __getitem__(self, key: str) -> str:
        return self._all()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(_GRAMMARS)

    def __len__(self) -> int:
        return len(_GRAMMARS)


GRAMMAR_VERSIONS: Mapping[str, str] = _Versions()


# -- the document -----------------------------------------------------------------------------
class _Doc:
    """A document's text and bytes, and tree-sitter's UTF-8 byte positions as character
    offsets: free for ASCII text; otherwise from the line's start, found by the position's
    row, by decoding the bytes before it on its line (a table per line for long lines)."""

    def __init__(self, text: str) -> None:
        self.text = text
        # surrogatepass: a lone surrogate must not make the document unreadable.
        self.data = text.encode("utf-8", "surrogatepass")
        self.ascii = len(self.data) == len(text)
        self._line_starts: list[int] = []
        self._tables: dict[int, list[int]] = {}

    def _starts(self) -> list[int]:
        """The character offset of each line's start."""
        starts = self._line_starts
        if not starts:
            starts.append(0)
            i = self.text.find("\n")
            while i != -1:
                starts.append(i + 1)
                i = self.text.find("\n", i + 1)
        return starts

    def _at(self, byte: int, point: tuple[int, int]) -> int:
        if self.ascii:
            return byte
        starts = self._starts()
        row, col = point
        if row >= len(starts):
            return len(self.text)
        line_start = starts[row]
        if col == 0:
            return line_start
        table = self._tables.get(row)
        if table is None:
            if col <= 256:
                try:
                    head = self.data[byte - col:byte].decode("utf-8", "surrogatepass")
                    return line_start + len(head)
                except UnicodeDecodeError:  # a position inside a broken sequence
                    pass
            table = self._tables[row] = self._table(row)
        return line_start + table[min(col, len(table) - 1)]

    def _table(self, row: int) -> list[int]:
        """Byte column -> character column of one line."""
        starts = self._starts()
        end = starts[row + 1] if row + 1 < len(starts) else len(self.text)
        line = self.text[starts[row]:end]
        table: list[int] = []
        for i, ch in enumerate(line):
            o = ord(ch)
            table.extend([i] * (1 if o < 0x80 else 2 if o < 0x800 else 3 if o < 0x10000 else 4))
        table.append(len(line))
        return table

    def start(self, node: Node) -> int:
        return self._at(node.start_byte, node.start_point)

    def end(self, node: Node) -> int:
        return self._at(node.end_byte, node.end_point)

    def slice(self, node: Node) -> str:
        return self.text[self.start(node):self.end(node)]

    def name(self, node: Node) -> str:
        """A node's text as a label: one line, at most ``MAX_NAME`` characters."""
        start = self.start(node)
        return _collapse(self.text[start:min(self.end(node), start + 4 * MAX_NAME)], MAX_NAME)

    def line_of(self, pos: int) -> tuple[int, int]:
        """(start, end) of the line holding ``pos``, newline excluded."""
        starts = self._starts()
        i = bisect.bisect_right(starts, pos)
        return starts[i - 1], starts[i] - 1 if i < len(starts) else len(self.text)

    def unit(self, node: Node, kind: str, name: str = "", children: list[Unit] | None = None,
             signature: str = "", standalone: bool = False) -> Unit:
        start = self.start(node)
        return Unit(start, max(start, self.end(node)), kind, name, children or [], signature,
                    standalone)


def _collapse(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def _multiline(node: Node) -> bool:
    return node.end_point[0] > node.start_point[0]


def _kids(node: Node) -> Iterator[tuple[Node, str | None]]:
    """Children with their field names."""
    cursor = node.walk()
    if not cursor.goto_first_child():
        return
    while True:
        child = cursor.node
        if child is not None:
            yield child, cursor.field_name
        if not cursor.goto_next_sibling():
            return


def _lone_semicolon(doc: _Doc, node: Node) -> bool:
    return (node.named_child_count == 0 and node.end_byte - node.start_byte == 1
            and doc.data[node.start_byte:node.end_byte] == b";")


class _Acc:
    """Units of one sequence, in order; a ``;``, ``,`` or comment right after a unit on its
    last line joins it (else the packer would start the next unit mid-line)."""

    def __init__(self, doc: _Doc) -> None:
        self.doc = doc
        self.units: list[Unit] = []
        self._row = -1

    def add(self, unit: Unit, node: Node) -> Unit:
        self.units.append(unit)
        self._row = node.end_point[0]
        return unit

    def extend(self, unit: Unit, node: Node) -> None:
        unit.end = max(unit.end, self.doc.end(node))
        self._row = node.end_point[0]

    def tail(self, node: Node) -> bool:
        """Attach ``node`` to the last unit when it starts on that unit's last line."""
        if self.units and node.start_point[0] == self._row:
            self.extend(self.units[-1], node)
            return True
        return False


def _normalize(unit: Unit) -> Unit:
    """A single child spanning its whole parent is no split point: use its children."""
    while (len(unit.children) == 1 and unit.children[0].start <= unit.start
           and unit.children[0].end >= unit.end):
        unit.children = unit.children[0].children
    return unit


# -- code -------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Def:
    """A definition found in the tree: what it is, and the nodes its label comes from."""

    kind: str
    node: Node
    name: Node | None
    body: Node | None
    label: str | None = None  # set by a hook that knows better than the generic rule


_Hook = Callable[["_Code", Node], "_Def | None"]


@dataclass(frozen=True, slots=True)
class _Spec:
    """How one grammar's nodes map to units."""

    # node type -> unit kind ("function" becomes "method" inside a class-like container)
    defs: Mapping[str, str]
    # nodes whose named children are statements or members (bodies, blocks, literals)
    blocks: frozenset[str]
    # a definition's body when it has no "body" field
    bodies: frozenset[str] = frozenset()
    imports: frozenset[str] = frozenset()
    # the unit spans the wrapper; what it is comes from the definition inside
    wrappers: frozenset[str] = frozenset()
    # spliced into the enclosing sequence (Go's statement_list, C's #ifdef)
    transparent: frozenset[str] = frozenset()
    # never units: their lines go to the unit that follows (decorators in a class body)
    skip: frozenset[str] = frozenset()
    # leading children left out of a label ("public static", annotations)
    label_skip: frozenset[str] = frozenset()
    # definitions labelled by their name alone (where a return type precedes the name)
    by_name: frozenset[str] = frozenset()
    # node type -> hook deciding whether (and what) definition the node is
    hooks: Mapping[str, _Hook] = field(default_factory=dict)
    is_import: Callable[[_Doc, Node], bool] | None = None
    docstring: bool = False


class _Code:
    """The outline of one parsed code file under a ``_Spec``."""

    def __init__(self, doc: _Doc, spec: _Spec) -> None:
        self.doc = doc
        self.spec = spec

    def outline(self, root: Node) -> list[Unit]:
        return self._seq(root, 0, in_class=False, top=True)

    # -- sequences ----------------------------------------------------------------------------
    def _children(self, node: Node) -> Iterator[tuple[Node, str | None]]:
        transparent = self.spec.transparent
        for child, fname in _kids(node):
            if child.type in transparent and child.is_named and fname not in _HEAD_FIELDS:
                yield from self._children(child)
            else:
                yield child, fname

    def _seq(self, parent: Node, depth: int, in_class: bool, top: bool = False) -> list[Unit]:
        """Units for the statements or members directly inside ``parent``."""
        spec, doc = self.spec, self.doc
        acc = _Acc(doc)
        imports: Unit | None = None
        first = True
        for child, fname in self._children(parent):
            t = child.type
            if not child.is_named:
                if t in _TAIL_TOKENS:
                    acc.tail(child)
                continue
            if t in _COMMENTS:
                acc.tail(child)
                continue
            # A lone ';' after a unit on its line ("}; // namespace g": an empty statement
            # or declaration in most grammars) ends that unit, as the unnamed one does.
            if _lone_semicolon(doc, child) and acc.tail(child):
                continue
            if fname in _HEAD_FIELDS or t in spec.skip:
                continue
            if top and first and spec.docstring and _is_docstring(child):
                acc.add(doc.unit(child, "docstring", standalone=True), child)
            elif t in spec.imports or (spec.is_import is not None and spec.is_import(doc, child)):
                if imports is not None and acc.units and acc.units[-1] is imports:
                    acc.extend(imports, child)
                else:
                    imports = acc.add(doc.unit(child, "imports", standalone=top), child)
            else:
                acc.add(self._unit(child, depth, in_class), child)
            first = False
        return acc.units

    def _nested(self, node: Node, depth: int) -> list[Unit]:
        """Split points inside a statement: the statements of the blocks it holds."""
        if depth >= MAX_DEPTH or not _multiline(node):
            return []
        if node.type in self.spec.blocks:
            return self._seq(node, depth + 1, in_class=False)
        out: list[Unit] = []
        self._search(node, out, depth, SEARCH_DEPTH)
        return out

    def _search(self, node: Node, out: list[Unit], depth: int, levels: int) -> None:
        for child in node.named_children:
            if child.type in self.spec.blocks:
                out.extend(self._seq(child, depth + 1, in_class=False))
            elif levels > 1 and _multiline(child):  # (one line: no block below it to find)
                self._search(child, out, depth, levels - 1)

    # -- units --------------------------------------------------------------------------------
    def _unit(self, node: Node, depth: int, in_class: bool) -> Unit:
        doc = self.doc
        if depth >= MAX_DEPTH:
            return doc.unit(node, "statements")
        d = self._def(node)
        if d is None:
            return _normalize(doc.unit(node, "statements", children=self._nested(node, depth)))
        kind = "method" if d.kind == "function" and in_class else d.kind
        children: list[Unit] = []
        if d.body is not None:
            if kind in _CONTAINERS:
                children = self._body(d.body, depth, kind not in ("module", "namespace"))
            elif kind in _FUNCTIONS:
                children = self._body(d.body, depth, False)
            else:
                children = self._nested(d.body, depth)
        elif kind not in _FUNCTIONS:
            children = self._nested(d.node, depth)
        unit = doc.unit(node, kind, self._label(d), children, self._signature(d))
        return _normalize(unit)

    def _body(self, body: Node, depth: int, in_class: bool) -> list[Unit]:
        spec = self.spec
        if body.type in spec.blocks or body.type in spec.bodies:
            return self._seq(body, depth + 1, in_class)
        return self._nested(body, depth)

    def _def(self, node: Node) -> _Def | None:
        spec = self.spec
        t = node.type
        if t in spec.wrappers:
            for child in node.named_children:
                if child.type in _COMMENTS:
                    continue
                inner = self._def(child)
                if inner is not None:
                    return inner
            return None
        hook = spec.hooks.get(t)
        if hook is not None:
            return hook(self, node)
        kind = spec.defs.get(t)
        if kind is None:
            return None
        return _Def(kind, node, node.child_by_field_name("name"), self._body_of(node))

    def _body_of(self, node: Node) -> Node | None:
        body = node.child_by_field_name("body")
        if body is not None:
            return body
        for child in node.named_children:
            if child.type in self.spec.bodies:
                return child
        return None

    # -- labels -------------------------------------------------------------------------------
    def _head(self, node: Node) -> Node:
        """The first child of a definition that is part of its label."""
        skip = self.spec.label_skip
        for child in node.children:
            if child.type not in skip and child.type not in _COMMENTS:
                return child
        return node

    def _label(self, d: _Def) -> str:
        if d.label is not None:
            return d.label
        doc = self.doc
        if d.name is not None and d.node.type in self.spec.by_name:
            return doc.name(d.name)
        start = doc.start(self._head(d.node))
        if d.name is not None:
            end = doc.end(d.name)
        elif d.body is not None:
            end = doc.start(d.body)
        else:
            end = doc.line_of(start)[1]
        if end <= start and d.name is not None:
            start, end = doc.start(d.name), doc.end(d.name)
        return _collapse(doc.text[start:min(end, start + 4 * MAX_NAME)], MAX_NAME)

    def _signature(self, d: _Def) -> str:
        """The line of the definition's name (not of its decorators or annotations); a
        head that runs over several lines, up to its body, as one line."""
        doc = self.doc
        anchor = d.name if d.name is not None else self._head(d.node)
        line_start, line_end = doc.line_of(doc.start(anchor))
        end = line_end
        if d.body is not None and doc.start(d.body) > line_end:
            end = self._head_end(d.node, d.body)
        end = min(max(end, line_end), line_start + 4 * MAX_SIGNATURE)
        return _collapse(doc.text[line_start:end], MAX_SIGNATURE)

    def _head_end(self, node: Node, body: Node) -> int:
        """Where the head before ``body`` ends, comments between them left out."""
        end = self.doc.start(node)
        for child in node.children:
            if child.start_byte >= body.start_byte:
                break
            if child.type in _COMMENTS:
                continue
            if child.end_byte > body.start_byte:  # holds the body (a declarator, a value)
                return self.doc.start(body)
            end = self.doc.end(child)
        return end


def _is_docstring(node: Node) -> bool:
    return (node.type == "expression_statement" and node.named_child_count == 1
            and node.named_children[0].type in ("string", "concatenated_string"))


# -- hooks --------------------------------------------------------------------------------------
def _js_variable(o: _Code, node: Node) -> _Def | None:
    """``const f = (x) => {...}`` is a function; ``const C = class {...}`` a class."""
    declarators = [c for c in node.named_children if c.type == "variable_declarator"]
    if len(declarators) != 1:
        return None
    value = declarators[0].child_by_field_name("value")
    name = declarators[0].child_by_field_name("name")
    if value is None or name is None:
        return None
    if value.type in ("arrow_function", "function_expression", "function",
                      "generator_function"):
        return _Def("function", node, name, value.child_by_field_name("body"))
    if value.type in ("class", "class_expression"):
        return _Def("class", node, name, value.child_by_field_name("body"))
    return None


def _js_require(doc: _Doc, node: Node) -> bool:
    """``const x = require("y")`` belongs to the imports block."""
    if node.type not in ("lexical_declaration", "variable_declaration") or _multiline(node):
        return False
    for d in node.named_children:
        value = d.child_by_field_name("value") if d.type == "variable_declarator" else None
        if value is None:
            continue
        while value.type in ("member_expression", "await_expression") and value.named_children:
            value = value.named_children[0]
        fn = value.child_by_field_name("function") if value.type == "call_expression" else None
        if fn is not None and doc.slice(fn) == "require":
            return True
    return False


def _go_type(o: _Code, node: Node) -> _Def | None:
    specs = [c for c in node.named_children if c.type in ("type_spec", "type_alias")]
    if len(specs) != 1:
        return None  # a ``type (...)`` group: its specs are statements
    spec = specs[0]
    value = spec.child_by_field_name("type")
    kind, body = "type", None
    if value is not None and value.type == "struct_type":
        kind = "struct"
        body = next((c for c in value.named_children if c.type == "field_declaration_list"),
                    None)
    elif value is not None and value.type == "interface_type":
        kind, body = "interface", value
    return _Def(kind, node, spec.child_by_field_name("name"), body)


# Names a Go const/var group's label shows.
MAX_GO_NAMES = 2


def _go_values(o: _Code, node: Node) -> _Def | None:
    """``const``/``var`` declarations, one or a ``( … )`` group: a "variable" unit labelled by
    the names it declares (``const DefaultVersion, DefaultImage, …``), as Rust's ``const``
    and ``static`` items are; a group too big for one chunk splits at its specs. Package
    level only: a function's local ``var x`` stays one of its statements."""
    if node.parent is None or node.parent.type != "source_file":
        return None
    names: list[str] = []
    pending = list(node.named_children)
    while pending and len(names) <= MAX_GO_NAMES:
        child = pending.pop(0)
        if child.type == "var_spec_list":
            pending[:0] = child.named_children
        elif child.type in ("const_spec", "var_spec"):
            names += [o.doc.name(n) for n in child.children_by_field_name("name")]
    if not names:
        return None
    keyword = "const" if node.type == "const_declaration" else "var"
    shown = ", ".join(names[:MAX_GO_NAMES]) + (", …" if len(names) > MAX_GO_NAMES else "")
    return _Def("variable", node, None, node, label=_collapse(f"{keyword} {shown}", MAX_NAME))


_C_NAMES = frozenset({"identifier", "field_identifier", "qualified_identifier",
                      "destructor_name", "operator_name", "template_function", "type_identifier",
                      "operator_cast"})


def _c_function(o: _Code, node: Node) -> _Def | None:
    """The name of a C/C++ function is deep in its declarator (``*f(int)``, ``A::f()``)."""
    d = node.child_by_field_name("declarator")
    for _ in range(8):
        if d is None or d.type in _C_NAMES:
            break
        d = d.child_by_field_name("declarator")
    return _Def("function", node, d, node.child_by_field_name("body"))


def _c_specifier(o: _Code, node: Node) -> _Def | None:
    """``struct x {...}`` (with a body) is a struct; ``struct x`` alone is a reference."""
    body = node.child_by_field_name("body")
    if body is None:
        return None
    kind = {"enum_specifier": "enum", "class_specifier": "class"}.get(node.type, "struct")
    return _Def(kind, node, node.child_by_field_name("name"), body)


def _c_typedef(o: _Code, node: Node) -> _Def | None:
    """``typedef struct {...} name_t;``: a struct named by its tag, else its typedef."""
    spec = node.child_by_field_name("type")
    if spec is None or spec.type not in ("struct_specifier", "union_specifier",
                                         "enum_specifier"):
        return None
    body = spec.child_by_field_name("body")
    if body is None:
        return None
    name = spec.child_by_field_name("name") or node.child_by_field_name("declarator")
    keyword = spec.type.split("_")[0]
    label = f"{keyword} {o.doc.name(name)}" if name else keyword
    return _Def("enum" if keyword == "enum" else "struct", node, name, body, label)


def _kotlin_class(o: _Code, node: Node) -> _Def | None:
    """``class``, ``interface`` and ``enum class`` share one node type."""
    kind, label = "class", None
    name = node.child_by_field_name("name")
    for child in node.children:
        if child.type == "interface":
            kind = "interface"
        elif child.type == "modifiers" and "enum" in o.doc.slice(child).split():
            kind = "enum"
            label = f"enum class {o.doc.name(name)}" if name is not None else "enum class"
    return _Def(kind, node, name, o._body_of(node), label)


def _kotlin_alias(o: _Code, node: Node) -> _Def | None:
    """``typealias Urls = ...``: the grammar puts the alias's name in a "type" field."""
    name = node.child_by_field_name("type")
    return _Def("type", node, name, None)


def _rust_mod(doc: _Doc, node: Node) -> bool:
    """``mod util;`` (no body) declares a file: part of the imports block."""
    return node.type == "mod_item" and node.child_by_field_name("body") is None


def _php_import(doc: _Doc, node: Node) -> bool:
    if node.type == "namespace_definition":
        return node.child_by_field_name("body") is None
    if node.type == "expression_statement" and node.named_child_count == 1:
        return node.named_children[0].type in (
            "include_expression", "include_once_expression", "require_expression",
            "require_once_expression")
    return False


def _ruby_require(doc: _Doc, node: Node) -> bool:
    if node.type != "call" or node.child_by_field_name("receiver") is not None:
        return False
    method = node.child_by_field_name("method")
    return method is not None and doc.slice(method) in (
        "require", "require_relative", "load", "autoload")


def _bash_source(doc: _Doc, node: Node) -> bool:
    if node.type != "command":
        return False
    name = node.child_by_field_name("name")
    return name is not None and doc.slice(name) in ("source", ".")


# -- the code grammars ----------------------------------------------------------------------------
_JS_DEFS = {
    "class_declaration": "class", "class": "class", "abstract_class_declaration": "class",
    "function_declaration": "function", "generator_function_declaration": "function",
    "function_signature": "function", "method_definition": "method",
    "method_signature": "method", "abstract_method_signature": "method",
    "interface_declaration": "interface", "type_alias_declaration": "type",
    "enum_declaration": "enum", "internal_module": "namespace", "module": "module",
}
_JS = _Spec(
    defs=_JS_DEFS,
    blocks=frozenset({"statement_block", "class_body", "interface_body", "switch_body",
                      "switch_case", "switch_default", "object", "array", "object_type"}),
    imports=frozenset({"import_statement"}),
    wrappers=frozenset({"export_statement", "ambient_declaration", "expression_statement"}),
    skip=frozenset({"decorator", "hash_bang_line"}),
    label_skip=frozenset({"decorator", "accessibility_modifier", "override_modifier"}),
    hooks={"lexical_declaration": _js_variable, "variable_declaration": _js_variable},
    is_import=_js_require,
)
_C_HOOKS: dict[str, _Hook] = {
    "function_definition": _c_function, "struct_specifier": _c_specifier,
    "union_specifier": _c_specifier, "enum_specifier": _c_specifier,
    "type_definition": _c_typedef,
}
_C_TRANSPARENT = frozenset({"preproc_if", "preproc_ifdef", "preproc_else", "preproc_elif",
                            "preproc_elifdef", "linkage_specification", "declaration_list"})
_C_BLOCKS = frozenset({"compound_statement", "field_declaration_list", "enumerator_list",
                       "initializer_list", "case_statement"})

_SPECS: dict[str, _Spec] = {
    "python": _Spec(
        defs={"class_definition": "class", "function_definition": "function"},
        blocks=frozenset({"block", "dictionary", "list", "set"}),
        imports=frozenset({"import_statement", "import_from_statement",
                           "future_import_statement"}),
        wrappers=frozenset({"decorated_definition"}),
        label_skip=frozenset({"decorator"}),
        docstring=True,
    ),
    "javascript": _JS,
    "typescript": _JS,
    "tsx": _JS,
    "go": _Spec(
        defs={"function_declaration": "function", "method_declaration": "method"},
        blocks=frozenset({"block", "field_declaration_list", "interface_type",
                          "literal_value", "const_declaration", "var_spec_list",
                          "type_declaration", "expression_case", "type_case",
                          "communication_case", "default_case"}),
        imports=frozenset({"package_clause", "import_declaration"}),
        transparent=frozenset({"statement_list"}),
        hooks={"type_declaration": _go_type, "const_declaration": _go_values,
               "var_declaration": _go_values},
    ),
    "rust": _Spec(
        defs={"function_item": "function", "function_signature_item": "function",
              "struct_item": "struct", "union_item": "struct", "enum_item": "enum",
              "trait_item": "trait", "impl_item": "impl", "mod_item": "module",
              "macro_definition": "macro", "const_item": "variable",
              "static_item": "variable", "type_item": "type",
              "foreign_mod_item": "module"},
        blocks=frozenset({"block", "declaration_list", "field_declaration_list",
                          "enum_variant_list", "match_block", "array_expression",
                          "field_initializer_list"}),
        imports=frozenset({"use_declaration", "extern_crate_declaration"}),
        skip=frozenset({"attribute_item", "inner_attribute_item"}),
        label_skip=frozenset({"visibility_modifier", "function_modifiers", "attribute_item"}),
        is_import=_rust_mod,
    ),
    "java": _Spec(
        defs={"class_declaration": "class", "record_declaration": "class",
              "interface_declaration": "interface", "annotation_type_declaration":
              "interface", "enum_declaration": "enum", "method_declaration": "function",
              "constructor_declaration": "function",
              "compact_constructor_declaration": "function"},
        blocks=frozenset({"block", "class_body", "interface_body", "enum_body",
                          "constructor_body", "switch_block", "switch_block_statement_group",
                          "annotation_type_body", "array_initializer"}),
        imports=frozenset({"package_declaration", "import_declaration"}),
        transparent=frozenset({"enum_body_declarations"}),
        label_skip=frozenset({"modifiers"}),
        by_name=frozenset({"method_declaration", "constructor_declaration",
                           "compact_constructor_declaration"}),
    ),
    "c": _Spec(
        defs={"preproc_function_def": "macro", "preproc_def": "macro"},
        blocks=_C_BLOCKS,
        imports=frozenset({"preproc_include"}),
        transparent=_C_TRANSPARENT,
        by_name=frozenset({"function_definition", "preproc_function_def", "preproc_def"}),
        hooks=_C_HOOKS,
    ),
    "cpp": _Spec(
        defs={"preproc_function_def": "macro", "preproc_def": "macro",
              "namespace_definition": "namespace", "alias_declaration": "type",
              "concept_definition": "type"},
        blocks=_C_BLOCKS | {"declaration_list"},  # a namespace's body
        imports=frozenset({"preproc_include", "using_declaration"}),
        wrappers=frozenset({"template_declaration"}),
        transparent=_C_TRANSPARENT,
        skip=frozenset({"access_specifier"}),
        label_skip=frozenset({"attribute_declaration", "virtual"}),
        by_name=frozenset({"function_definition", "preproc_function_def", "preproc_def"}),
        hooks={**_C_HOOKS, "class_specifier": _c_specifier},
    ),
    "csharp": _Spec(
        defs={"class_declaration": "class", "record_declaration": "class",
              "record_struct_declaration": "struct", "struct_declaration": "struct",
              "interface_declaration": "interface", "enum_declaration": "enum",
              "namespace_declaration": "namespace", "method_declaration": "function",
              "constructor_declaration": "function", "destructor_declaration": "function",
              "operator_declaration": "function", "local_function_statement": "function",
              "conversion_operator_declaration": "function", "delegate_declaration": "type"},
        blocks=frozenset({"block", "declaration_list", "switch_body", "switch_section",
                          "accessor_list", "initializer_expression",
                          "enum_member_declaration_list"}),
        imports=frozenset({"using_directive", "extern_alias_directive",
                           "file_scoped_namespace_declaration"}),
        label_skip=frozenset({"attribute_list", "modifier"}),
        by_name=frozenset({"method_declaration", "constructor_declaration",
                           "destructor_declaration", "local_function_statement"}),
    ),
    "ruby": _Spec(
        defs={"class": "class", "singleton_class": "class", "module": "module",
              "method": "function", "singleton_method": "function"},
        blocks=frozenset({"body_statement", "block_body", "then", "else", "do", "begin",
                          "ensure", "case", "hash", "array"}),
        is_import=_ruby_require,
    ),
    "php": _Spec(
        defs={"class_declaration": "class", "interface_declaration": "interface",
              "trait_declaration": "trait", "enum_declaration": "enum",
              "function_definition": "function", "method_declaration": "function",
              "namespace_definition": "namespace"},
        blocks=frozenset({"compound_statement", "declaration_list", "enum_declaration_list",
                          "switch_block", "colon_block", "match_block",
                          "array_creation_expression"}),
        imports=frozenset({"namespace_use_declaration", "declare_statement"}),
        skip=frozenset({"php_tag"}),
        label_skip=frozenset({"attribute_list", "visibility_modifier", "static_modifier",
                              "abstract_modifier", "final_modifier", "readonly_modifier",
                              "var_modifier"}),
        is_import=_php_import,
    ),
    "kotlin": _Spec(
        defs={"object_declaration": "class", "companion_object": "class",
              "function_declaration": "function", "secondary_constructor": "function"},
        blocks=frozenset({"block", "class_body", "enum_class_body", "lambda_literal",
                          "when_expression", "when_entry"}),
        bodies=frozenset({"class_body", "enum_class_body", "function_body"}),
        imports=frozenset({"package_header", "import", "import_list", "import_header"}),
        transparent=frozenset({"block"}),
        label_skip=frozenset({"modifiers"}),
        hooks={"class_declaration": _kotlin_class, "type_alias": _kotlin_alias},
    ),
    "bash": _Spec(
        defs={"function_definition": "function"},
        blocks=frozenset({"compound_statement", "do_group", "if_statement", "elif_clause",
                          "else_clause", "case_statement", "case_item", "subshell"}),
        by_name=frozenset({"function_definition"}),
        is_import=_bash_source,
    ),
}


_BLANK = b" \t\r\n\f\v\xef\xbb\xbf"  # whitespace, and a byte-order mark


# Parse time allowed per document: PARSE_BASE_S + PARSE_S_PER_MB per MB of source. Valid
# code parses at ~10 MB/s here (the Python standard library: 117 KB in 10 ms), so this is
# 20x and more of headroom; some broken inputs make a grammar's error recovery superlinear
# (240 KB of "fun f() = g<A<" lines: 15 s in tree-sitter-kotlin, 960 KB: minutes), and a
# parse holds the GIL except in its progress callbacks. Such a document gets windows
# (fallback "parse-timeout"), as any other one whose tree cannot be had.
PARSE_BASE_S = 0.5
PARSE_S_PER_MB = 2.0
_READ = 1 << 16
# tree-sitter-yaml 0.7's scanner keeps its indentation levels in a fixed-size state and
# kills the process past ~250 of them (a mapping nested 255 levels deep, or "- " 255 times
# on a line): YAML nested deeper than this is cut by windows (fallback "too-deep").
YAML_MAX_LEVELS = 128


def _parse(language: str, doc: _Doc) -> Node:
    """The tree's root; Fallback when the tree has errors or leaves text out, or when the
    parse runs out of its time (``PARSE_BASE_S`` + ``PARSE_S_PER_MB`` per MB) or meets an
    error on the way (it stops there: the tree would not be used)."""
    data = doc.data
    deadline = time.monotonic() + PARSE_BASE_S + PARSE_S_PER_MB * len(data) / 1e6
    late = False

    def progress(_offset: int, has_error: bool) -> bool:  # True cancels the parse
        nonlocal late
        late = time.monotonic() > deadline
        return has_error or late

    try:
        tree = _parser(language).parse(lambda at, _point: data[at:at + _READ],
                                       progress_callback=progress)
    except ValueError:  # cancelled ("Parsing failed")
        _parser(language).reset()
        raise Fallback("parse-timeout" if late else "parse-error") from None
    root = tree.root_node
    if root.has_error:
        raise Fallback("parse-error")
    # Some grammars stop early without an error (tree-sitter-kotlin 1.1 at a CJK letter in
    # an identifier drops the rest of the file): text outside every top-level node means
    # the tree does not describe the document.
    pos = 0
    for child in root.children:
        if data[pos:child.start_byte].strip(_BLANK):
            raise Fallback("parse-error")
        pos = max(pos, child.end_byte)
    if data[pos:].strip(_BLANK):
        raise Fallback("parse-error")
    return root


# Annotation macros the grammars cannot read, so a file using them was a parse error and
# fell back to windows whole: an all-caps macro between `class`/`struct` and the name
# (`class LEVELDB_EXPORT DB {`), one at the start of a declaration (`LEVELDB_EXPORT Env*
# NewMemEnv(...)`, with an underscore in its name: `FILE* f` is a type), a call-like one
# after a parameter list (`void Lock() EXCLUSIVE_LOCK_FUNCTION();`; after a type it could
# be the function's own name, `unsigned int LRU_CLOCK(void) {`), and `GUARDED_BY(mu_)`
# after a member (`int refs_ GUARDED_BY(mu_);`). Blanked (spaces, same length) for the
# parse only: offsets, the returned text and signatures are the document's own. On real
# trees: google/leveldb 18 more of 133 C/C++ files outlined, redis 27 more of 715, none
# fewer (cJSON's 99 unchanged).
_ANNOTATION_MACROS = re.compile(
    rb"(?m)(?:^([ \t]*(?:class|struct)[ \t]+)([A-Z][A-Z0-9_]*[ \t]+)"
    rb"(?=[A-Za-z_]\w*(?:[ \t]+final)?[ \t]*(?:[:{]|$))"
    rb"|^([ \t]*)([A-Z][A-Z0-9]*_[A-Z0-9_]*[ \t]+)"
    rb"(?=(?:const[ \t]+)?[A-Za-z_][\w:<>]*[ \t*&]+[A-Za-z_~])"
    rb"|(\)(?:[ \t]+(?:const|override|final|noexcept))*[ \t]+)"
    rb"([A-Z][A-Z0-9]*_[A-Z0-9_]*\([^()\n]*\))(?=[ \t]*[;{])"
    rb"|(\w[ \t]+)((?:[A-Z0-9]+_)*(?:PT_)?GUARDED_BY\([^()\n]*\))(?=[ \t]*[;=]))")


def _without_annotation_macros(data: bytes) -> bytes:
    def blank(m: re.Match[bytes]) -> bytes:
        # Each alternative is (what stays)(the macro): the macro is the last group matched.
        last = m.lastindex or 0
        return m.group(last - 1) + b" " * len(m.group(last))
    return _ANNOTATION_MACROS.sub(blank, data)


def _outline_code(language: str, content: str) -> list[Unit]:
    doc = _Doc(content)
    if language in ("c", "cpp"):
        doc.data = _without_annotation_macros(doc.data)
    root = _parse(language, doc)
    try:
        return _Code(doc, _SPECS[language]).outline(root)
    except RecursionError:
        raise Fallback("too-deep") from None


# -- config and data ------------------------------------------------------------------------------
def _entries(doc: _Doc, node: Node, depth: int,
             member: Callable[[_Doc, Node, int], Unit | None]) -> list[Unit]:
    """Units for ``node``'s named children made by ``member`` (None: not a unit)."""
    acc = _Acc(doc)
    if depth >= MAX_DEPTH:
        return []
    for child in node.children:
        if not child.is_named:
            if child.type in _TAIL_TOKENS:
                acc.tail(child)
            continue
        if child.type in _COMMENTS:
            acc.tail(child)
            continue
        unit = member(doc, child, depth)
        if unit is not None:
            acc.add(unit, child)
    return acc.units


def _first_line(doc: _Doc, node: Node) -> str:
    start = doc.start(node)
    end = min(doc.line_of(start)[1], start + 4 * MAX_SIGNATURE)
    return _collapse(doc.text[start:end], MAX_SIGNATURE)


# YAML: top-level keys (and a multi-document stream's documents), nested keys as children.
_YAML_MAPS = frozenset({"block_mapping", "flow_mapping"})
_YAML_SEQS = frozenset({"block_sequence", "flow_sequence"})


def _yaml_inner(doc: _Doc, node: Node | None, depth: int) -> list[Unit]:
    """The entries of a YAML value: its keys, or its items."""
    for _ in range(6):  # through document > block_node > (anchor, tag) > mapping
        if node is None or node.type in _YAML_MAPS or node.type in _YAML_SEQS:
            break
        values = [c for c in node.named_children
                  if c.type in ("block_node", "flow_node") or c.type in _YAML_MAPS
                  or c.type in _YAML_SEQS]
        node = values[-1] if values else None
    if node is None or not _multiline(node):
        return []
    return _entries(doc, node, depth + 1, _yaml_member)


def _yaml_member(doc: _Doc, node: Node, depth: int) -> Unit | None:
    if node.type in ("block_mapping_pair", "flow_pair"):
        key = node.child_by_field_name("key")
        name = doc.name(key) if key is not None else ""
        children = _yaml_inner(doc, node.child_by_field_name("value"), depth)
        return doc.unit(node, "entry", name, children, _first_line(doc, node))
    if node.type in ("block_sequence_item", "flow_node"):
        return doc.unit(node, "item", children=_yaml_inner(doc, node, depth))
    return doc.unit(node, "statements")


def _yaml_levels(content: str) -> int:
    """How many indentation levels deep ``content`` nests at most, as a block-structure
    scanner counts them: each deeper indented line opens one, and so does each compact
    "- " / "? " on a line ("- - - x" is three), at its own column, so that the levels it
    opens hold for the deeper lines below it (lines each indented past the last one's
    compact "- - - ... k:" nest as deep as all of them together)."""
    stack: list[int] = []
    deepest = 0
    for line in content.split("\n"):
        body = line.lstrip(" ")
        if not body.strip() or body.startswith("#"):
            continue
        column = len(line) - len(body)
        while stack and stack[-1] >= column:
            stack.pop()
        compact = _YAML_COMPACT.match(body)
        if compact is None:
            stack.append(column)
        else:
            stack.extend(column + m.start()
                         for m in _YAML_INDICATOR.finditer(compact.group(0)))
            if body[compact.end():].strip():  # what follows opens one more (a mapping)
                stack.append(column + compact.end())
        deepest = max(deepest, len(stack))
    return deepest


_YAML_COMPACT = re.compile(r"(?:[-?] +)+")
_YAML_INDICATOR = re.compile(r"[-?]")


def _outline_yaml(content: str) -> list[Unit]:
    if _yaml_levels(content) > YAML_MAX_LEVELS:
        raise Fallback("too-deep")
    doc = _Doc(content)
    root = _parse("yaml", doc)
    documents = [c for c in root.named_children if c.type == "document"]
    if len(documents) == 1:
        units = _yaml_inner(doc, documents[0], 0)
        return units or [doc.unit(documents[0], "statements")]
    units = []
    for i, d in enumerate(documents, start=1):
        if doc.slice(d).strip():
            units.append(doc.unit(d, "document", f"document {i}", _yaml_inner(doc, d, 0),
                                  _first_line(doc, d)))
    return units


# TOML: tables ("[x]", "[[x]]") with their pairs; top-level pairs.
def _toml_value(doc: _Doc, node: Node | None, depth: int) -> list[Unit]:
    if node is None or not _multiline(node) or node.type not in ("array", "inline_table"):
        return []
    return _entries(doc, node, depth + 1, _toml_member)


def _toml_member(doc: _Doc, node: Node, depth: int) -> Unit | None:
    named = node.named_children
    if node.type == "pair" and named:
        return doc.unit(node, "entry", doc.name(named[0]),
                        _toml_value(doc, named[-1], depth), _first_line(doc, node))
    if node.type in ("table", "table_array_element"):
        key = next((c for c in named if c.type != "pair" and c.type not in _COMMENTS), None)
        brackets = "[[{}]]" if node.type == "table_array_element" else "[{}]"
        name = brackets.format(doc.name(key)) if key is not None else ""
        return doc.unit(node, "table", name, _entries(doc, node, depth + 1, _toml_pair),
                        _first_line(doc, node))
    return doc.unit(node, "item" if depth else "statements",
                    children=_toml_value(doc, node, depth))


def _toml_pair(doc: _Doc, node: Node, depth: int) -> Unit | None:
    return _toml_member(doc, node, depth) if node.type == "pair" else None


def _outline_toml(content: str) -> list[Unit]:
    doc = _Doc(content)
    return _entries(doc, _parse("toml", doc), 0, _toml_member)


# JSON: an object's members (name = key) with nested members as children; array elements.
def _json_value(doc: _Doc, node: Node | None, depth: int) -> list[Unit]:
    if node is None or not _multiline(node) or node.type not in ("object", "array"):
        return []
    return _entries(doc, node, depth + 1, _json_member)


def _json_member(doc: _Doc, node: Node, depth: int) -> Unit | None:
    if node.type == "pair":
        key = node.child_by_field_name("key")
        name = doc.name(key).strip("\"'") if key is not None else ""
        return doc.unit(node, "entry", name, _json_value(doc, node.child_by_field_name("value"),
                                                         depth), _first_line(doc, node))
    return doc.unit(node, "item", children=_json_value(doc, node, depth))


def _outline_json(content: str) -> list[Unit]:
    doc = _Doc(content)
    root = _parse("json", doc)
    units: list[Unit] = []
    for value in root.named_children:
        if value.type in _COMMENTS:
            continue
        inner = _json_value(doc, value, -1)
        units.extend(inner or [doc.unit(value, "statements")])
    return units


# Dockerfile: stages (from FROM to the next), their instructions as children.
def _outline_dockerfile(content: str) -> list[Unit]:
    doc = _Doc(content)
    root = _parse("dockerfile", doc)
    units: list[Unit] = []
    stage: Unit | None = None
    for node in root.named_children:
        if node.type in _COMMENTS:
            continue
        if node.type == "from_instruction":
            line = _first_line(doc, node)
            stage = doc.unit(node, "stage", _collapse(line, MAX_NAME), signature=line)
            units.append(stage)
        elif stage is not None:
            stage.children.append(doc.unit(node, "instruction"))
            stage.end = max(stage.end, doc.end(node))
        else:
            units.append(doc.unit(node, "instruction"))
    return units


# Makefile: rules (name = targets) with recipe lines as children, variables, includes.
def _make_units(doc: _Doc, parent: Node, depth: int) -> list[Unit]:
    acc = _Acc(doc)
    imports: Unit | None = None
    if depth >= MAX_DEPTH:
        return []
    for node, fname in _kids(parent):
        if not node.is_named or fname == "condition":
            continue
        t = node.type
        if t in _COMMENTS:
            acc.tail(node)
            continue
        if t == "include_directive":
            if imports is not None and acc.units and acc.units[-1] is imports:
                acc.extend(imports, node)
            else:
                imports = acc.add(doc.unit(node, "imports", standalone=depth == 0), node)
            continue
        if t == "rule":
            targets = next((c for c in node.named_children if c.type == "targets"), None)
            name = doc.name(targets) if targets is not None else ""
            recipe = next((c for c in node.named_children if c.type == "recipe"), None)
            lines = ([doc.unit(c, "statements") for c in recipe.named_children
                      if c.type not in _COMMENTS] if recipe is not None else [])
            unit = doc.unit(node, "rule", name, lines, _first_line(doc, node))
        elif t in ("variable_assignment", "shell_assignment", "define_directive"):
            name_node = node.child_by_field_name("name")
            name = doc.name(name_node) if name_node is not None else ""
            unit = doc.unit(node, "variable", name, signature=_first_line(doc, node))
        elif t == "conditional":
            unit = doc.unit(node, "statements", children=_make_units(doc, node, depth + 1))
        else:
            unit = doc.unit(node, "statements")
        acc.add(unit, node)
    return acc.units


def _outline_make(content: str) -> list[Unit]:
    doc = _Doc(content)
    return _make_units(doc, _parse("make", doc), 0)


# SQL: statements, named by their leading keywords and object ("CREATE TABLE users").
def _sql_name(doc: _Doc, node: Node) -> str:
    words: list[str] = []
    for part in node.named_children[:3]:
        if part.type.startswith("keyword_"):
            words.append(doc.slice(part).upper())
            continue
        for child in part.named_children:
            if child.type.startswith("keyword_"):
                words.append(doc.slice(child).upper())
            elif child.type in ("object_reference", "relation", "identifier"):
                ref = child
                if child.type == "relation" and child.named_children:
                    ref = child.named_children[0]
                words.append(doc.name(ref))
                return _collapse(" ".join(words), MAX_NAME)
            if len(words) > 6:
                break
    return _collapse(" ".join(words), MAX_NAME) if words else _first_line(doc, node)


def _points(doc: _Doc, node: Node, depth: int) -> list[Unit]:
    """Split points of a long statement with no blocks: the parts of its widest node
    (a table's columns, an INSERT's rows, a query's clauses)."""
    if depth >= MAX_DEPTH or not _multiline(node):
        return []
    for _ in range(8):
        kids = [c for c in node.named_children if c.type not in _COMMENTS]
        multi = [k for k in kids if _multiline(k)]
        if len(multi) != 1:
            break
        rows = node.end_point[0] - node.start_point[0]
        if 2 * (multi[0].end_point[0] - multi[0].start_point[0]) < rows:
            break
        node = multi[0]
    acc = _Acc(doc)
    for child in node.children:
        if not child.is_named:
            if child.type in _TAIL_TOKENS:
                acc.tail(child)
        elif child.type in _COMMENTS:
            acc.tail(child)
        else:
            acc.add(doc.unit(child, "statements", children=_points(doc, child, depth + 1)),
                    child)
    return acc.units if len(acc.units) > 1 else []


def _outline_sql(content: str) -> list[Unit]:
    doc = _Doc(content)
    root = _parse("sql", doc)
    units: list[Unit] = []
    for node in root.children:
        if not node.is_named:
            if node.type == ";" and units:  # a statement's terminator, wherever it is
                units[-1].end = max(units[-1].end, doc.end(node))
            continue
        if node.type in _COMMENTS:
            continue
        if node.type == "statement":
            units.append(doc.unit(node, "statement", _sql_name(doc, node),
                                  _points(doc, node, 0), _first_line(doc, node)))
        else:
            units.append(doc.unit(node, "statements", children=_points(doc, node, 0)))
    return units


def _guarded(outline: Callable[[str], list[Unit]], content: str) -> list[Unit]:
    try:
        return outline(content)
    except RecursionError:
        raise Fallback("too-deep") from None


OUTLINERS: dict[str, Outliner] = {
    **{lang: partial(_outline_code, lang) for lang in _SPECS},
    "yaml": partial(_guarded, _outline_yaml),
    "toml": partial(_guarded, _outline_toml),
    "json": partial(_guarded, _outline_json),
    "dockerfile": partial(_guarded, _outline_dockerfile),
    "make": partial(_guarded, _outline_make),
    "sql": partial(_guarded, _outline_sql),
}
