"""Language detection from a document's path and first line."""

from __future__ import annotations

import posixpath
import re

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
    "gnumakefile": "make", "makefile.am": "make", "makefile.in": "make",
    "makefile.inc": "make", "gemfile": "ruby", "rakefile": "ruby", "vagrantfile": "ruby",
    "pipfile": "toml", "cargo.lock": "toml", "poetry.lock": "toml", "uv.lock": "toml",
    ".bashrc": "bash", ".bash_profile": "bash", ".profile": "bash", ".zshrc": "bash",
    ".zprofile": "bash", ".envrc": "bash", "pkgbuild": "bash", "brewfile": "ruby",
    "podfile": "ruby", "cmakelists.txt": "cmake", "jenkinsfile": "groovy",
    "build.bazel": "starlark", "workspace.bazel": "starlark", "go.mod": "gomod",
    "go.sum": "gosum",
    "readme": "text", "license": "text", "copying": "text",
}
_SHEBANG = {"python": "python", "node": "javascript", "bash": "bash", "sh": "bash",
            "zsh": "bash", "ksh": "bash", "dash": "bash", "ruby": "ruby", "perl": "perl",
            "php": "php"}
# env's options that take the next word as their argument ("env -u VAR python").
_ENV_ARGS = frozenset({"-u", "--unset", "-C", "--chdir", "-a", "--argv0"})

# What only C++ writes, at the start of a line (comments and strings aside, which a header
# rarely fills with these): a `.h` with any of them is C++, else C. `extern "C"` and
# `__cplusplus` guards are C headers made includable from C++, so they do not count.
_CPP_HEADER = re.compile(
    r"^[ \t]*(?:template[ \t]*<|namespace(?:[ \t]+[A-Za-z_][\w:]*)?[ \t]*\{"
    r"|(?:class|struct)[ \t]+(?:[A-Z_]+[ \t]+)?[A-Za-z_]\w*(?:[ \t]+final)?[ \t]*:[ \t]*"
    r"(?:public|protected|private|virtual)\b|class[ \t]+[A-Za-z_]\w*[ \t]*\{"
    r"|(?:public|protected|private)[ \t]*:|using[ \t]+namespace[ \t]"
    r"|#[ \t]*include[ \t]*<(?:iostream|string|vector|memory|map|unordered_map|"
    r"functional|optional|utility|algorithm|cstdint|cstddef|cstdio|cstdlib|cstring)>)"
    r"|\bstd::", re.MULTILINE)


def _header_language(content: str) -> str:
    """C or C++ for a `.h` file, by its content (the extension says nothing)."""
    return "cpp" if _CPP_HEADER.search(content) else "c"


DOC_LANGUAGES = frozenset({"markdown", "rst", "text"})

# Names people give a language in an override or a filter, to the name detection uses.
_ALIASES = {
    "py": "python", "python3": "python", "python2": "python", "js": "javascript",
    "node": "javascript", "jsx": "javascript", "ecmascript": "javascript", "ts": "typescript",
    "golang": "go", "rs": "rust", "c++": "cpp", "cxx": "cpp", "cc": "cpp", "c#": "csharp",
    "cs": "csharp", "c-sharp": "csharp", "rb": "ruby", "sh": "bash", "shell": "bash",
    "zsh": "bash", "kt": "kotlin", "yml": "yaml", "md": "markdown",
    "restructuredtext": "rst", "makefile": "make", "docker": "dockerfile",
    "plaintext": "text", "plain": "text", "txt": "text", "jsonc": "json", "json5": "json",
}


def _env_program(words: list[str]) -> str:
    """The program ``env`` runs, from the words after it (its options and their
    arguments, and NAME=VALUE settings, skipped; "-S"/"--split-string=" split)."""
    skip = False
    for w in words:
        if skip:
            skip = False
            continue
        if w.startswith("--split-string="):
            w = w.split("=", 1)[1]
        elif w in _ENV_ARGS:
            skip = True
            continue
        if not w or w.startswith("-") or "=" in w:
            continue
        return posixpath.basename(w)
    return ""


def normalize_language(name: str) -> str:
    """A language name as given in an override or a filter ("Python", " py ", "C++") as
    detection names it ("python", "cpp"); names it does not know, lowercased."""
    key = name.strip().lower()
    return _ALIASES.get(key, key)


def detect_language(path: str, content: str = "") -> str:
    """A lowercase language name; "text" when nothing identifies the file."""
    name = posixpath.basename(path.replace("\\", "/")).lower()
    if name in _BY_NAME:
        return _BY_NAME[name]
    if name.startswith(("dockerfile", "containerfile")) or name.endswith(".dockerfile"):
        return "dockerfile"
    _, ext = posixpath.splitext(name)
    if ext == ".h":
        return _header_language(content)
    if ext in _BY_EXTENSION:
        return _BY_EXTENSION[ext]
    head = content[1:] if content.startswith("\ufeff") else content  # a byte-order mark
    if head.startswith("#!"):
        first = head.split("\n", 1)[0]
        words = first[2:].strip().split()
        if words:
            program = posixpath.basename(words[0])
            if program == "env":  # "env -S python3 -u", "env -i bash": the program is the
                program = _env_program(words[1:]) or program
            program = program.rstrip("0123456789.")
            if program in _SHEBANG:
                return _SHEBANG[program]
    return "text"
