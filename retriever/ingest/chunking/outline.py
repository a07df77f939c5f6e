"""The outline of a document: the tree of units a structure-aware chunker packs.

An *outliner* reads one document and returns its top-level units in order: definitions,
statement groups, the imports block and the module docstring for code; sections (by
heading), paragraphs, fences and tables for docs. Each unit may list *children*: the inner
boundaries where it may be split when it does not fit the token budget (a class's methods,
a function's statements, a section's subsections and blocks, a paragraph's sentences).

Outliners only say where the structure is; ``structure.pack`` decides the chunks (whole
units that fit, neighbours merged, oversized units split at their children, windows for
what has no inner boundary). Offsets are character offsets into the document. They need
not be on line boundaries: the packer widens every unit to whole lines and hands the lines
between units (comments, decorators, blank lines) to the unit that follows them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class Unit:
    """One structural unit of a document, ``content[start:end]``."""

    start: int
    end: int
    # What it is, for the chunk's ``kind``: "function", "method", "class", "interface",
    # "struct", "enum", "impl", "module", "namespace", "imports", "docstring",
    # "statements", "variable", "type", "macro", "section", "paragraph", "code_block",
    # "table", "list", "sentences", "entry" (a top-level key of a config file), ...
    kind: str
    # Its label in a symbol path: "class Session", "def request", "func (c *Client) Do",
    # "Install", "[tool.ruff]"; "" when anonymous (a statement group, a paragraph).
    name: str = ""
    # Inner units, in order, disjoint, within [start, end): where an oversized unit splits.
    children: list[Unit] = field(default_factory=list)
    # The head a split piece carries in its embedded header, e.g. the definition's first
    # line "def request(self, method, url, params=None):" (one line, stripped); "" for none.
    signature: str = ""
    # Stands alone: never merged with neighbours (the imports block, the module docstring).
    standalone: bool = False


class Fallback(Exception):  # noqa: N818 — a signal, not an error: the document gets windows
    """Raised by an outliner when structure cannot be trusted; the document is then cut by
    ``windows/v1`` and each chunk records ``reason`` ("parse-error", "minified", ...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# (content) -> top-level units; raises Fallback. Must not raise anything else on any text
# (the chunker treats any other exception as a bug and degrades with reason "error").
Outliner = Callable[[str], list[Unit]]
