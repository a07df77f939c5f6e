"""Language detection from a document's path and first line."""

from __future__ import annotations

import posixpath

_BY_EXTENSION = {
    ".py": "python", ".pyi": "python", ".js": "javascript", ".mjs": "javascript",
    ".cjs": "javascript", ".jsx": "javascript", ".ts": "typescript", ".mts": "typescript",
    ".cts": "typescript", ".tsx": "tsx", ".go": "go", ".rs": "rust", ".java": "java",
    ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp", ".hpp": "cpp",
    ".hh": "cpp", ".hxx": "cpp", ".ipp": "cpp", ".inl": "cpp", ".tpp": "cpp",
    ".cs": "csharp", ".rb": "ruby", ".rake": "ruby", ".gemspec": "ruby", ".php": "php",
    ".kt": "kotlin", ".kts": "kotlin", ".swift": "swift", ".sh": "bash", ".bash": "bash",
    ".zsh": "bash", ".sql": "sql", ".scala": "scala", ".lua": "lua", ".r": "r", ".pl": "perl",
    ".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".json": "json", ".jsonc": "json",
    ".mk": "make", ".ini": "ini", ".cfg": "ini", ".xml": "xml", ".svg": "xml",
    ".xsd": "xml", ".xsl": "xml", ".xslt": "xml", ".plist": "xml", ".html": "html",
    ".htm": "html", ".xhtml": "html", ".css": "css", ".proto": "protobuf", ".md": "markdown",
    ".markdown": "markdown", ".rst": "rst", ".txt": "text", ".text": "text",
}
_BY_NAME = {
    "dockerfile": "dockerfile", "containerfile": "dockerfile", "makefile": "make",
    "gnumakefile": "make", "gemfile": "ruby", "rakefile": "ruby", "vagrantfile": "ruby",
    "pipfile": "toml",
    "readme": "text", "license": "text", "copying": "text",
}
_SHEBANG = {"python": "python", "node": "javascript", "bash": "bash", "sh": "bash",
            "zsh": "bash", "ruby": "ruby", "perl": "perl"}

DOC_LANGUAGES = frozenset({"markdown", "rst", "text"})


def detect_language(path: str, content: str = "") -> str:
    """A lowercase language name; "text" when nothing identifies the file."""
    name = posixpath.basename(path.replace("\\", "/")).lower()
    if name in _BY_NAME:
        return _BY_NAME[name]
    if name.startswith(("dockerfile", "containerfile")) or name.endswith(".dockerfile"):
        return "dockerfile"
    _, ext = posixpath.splitext(name)
    if ext in _BY_EXTENSION:
        return _BY_EXTENSION[ext]
    if content.startswith("#!"):
        first = content.split("\n", 1)[0]
        words = first[2:].strip().split()
        if words:
            program = posixpath.basename(words[0])
            if program == "env" and len(words) > 1:
                program = words[1]
            program = program.rstrip("0123456789.")
            if program in _SHEBANG:
                return _SHEBANG[program]
    return "text"
