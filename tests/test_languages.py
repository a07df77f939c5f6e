"""detect_language: extensions, special file names, shebangs, and the "text" fallback."""

from __future__ import annotations

import pytest

from retriever.domain import SearchFilter
from retriever.ingest.chunking import DOC_LANGUAGES, detect_language, normalize_language


@pytest.mark.parametrize(("given", "name"), [
    ("python", "python"), ("Python", "python"), (" PYTHON ", "python"), ("py", "python"),
    ("JS", "javascript"), ("TS", "typescript"), ("golang", "go"), ("C++", "cpp"),
    ("C#", "csharp"), ("sh", "bash"), ("YML", "yaml"), ("TEXT", "text"),
    ("Haskell", "haskell"), ("jsonc", "json"),
])
def test_override_names_are_normalized(given: str, name: str) -> None:
    assert normalize_language(given) == name
    # A search filter holds them as documents store them, for every engine and the catalog.
    assert SearchFilter(languages=(given,)).languages == (name,)


@pytest.mark.parametrize(
    ("path", "language"),
    [
        ("main.py", "python"),
        ("pkg/stubs.pyi", "python"),
        ("src/app.js", "javascript"),
        ("esm.mjs", "javascript"),
        ("view.jsx", "javascript"),
        ("api.ts", "typescript"),
        ("view.tsx", "tsx"),
        ("cmd/main.go", "go"),
        ("lib.rs", "rust"),
        ("Main.java", "java"),
        ("x.c", "c"),
        ("x.h", "c"),
        ("x.cc", "cpp"),
        ("x.cpp", "cpp"),
        ("x.hpp", "cpp"),
        ("Program.cs", "csharp"),
        ("app.rb", "ruby"),
        ("build.gradle.kts", "kotlin"),
        ("run.sh", "bash"),
        ("q.sql", "sql"),
        ("ci.yml", "yaml"),
        ("ci.yaml", "yaml"),
        ("pyproject.toml", "toml"),
        ("data.json", "json"),
        ("setup.cfg", "ini"),
        ("api.proto", "protobuf"),
        ("README.md", "markdown"),
        ("index.rst", "rst"),
        ("notes.txt", "text"),
        ("analysis.R", "r"),
        ("MAIN.PY", "python"),
        ("deep/dir.with.dots/file.go", "go"),
        ("windows\\style\\path.rs", "rust"),
        ("x.hxx", "cpp"),
        ("x.ipp", "cpp"),
        ("x.inl", "cpp"),
        ("esm.mts", "typescript"),
        ("tasks/db.rake", "ruby"),
        ("gem.gemspec", "ruby"),
        ("tsconfig.jsonc", "json"),
        ("rules.mk", "make"),
        ("CMakeLists.txt", "cmake"),  # no chunker: windows, "unsupported-language"
        ("main.tf", "text"),
        ("docs/logo.svg", "xml"),  # markup (often with base64 images), not prose
        ("schema.xsd", "xml"),
        ("Info.plist", "xml"),
        ("page.xhtml", "html"),
    ],
)
def test_extension(path: str, language: str) -> None:
    assert detect_language(path) == language


@pytest.mark.parametrize(
    ("path", "language"),
    [
        ("Dockerfile", "dockerfile"),
        ("docker/Dockerfile", "dockerfile"),
        ("Dockerfile.dev", "dockerfile"),
        ("dockerfile", "dockerfile"),
        ("Makefile", "make"),
        ("sub/makefile", "make"),
        ("GNUmakefile", "make"),
        ("Containerfile", "dockerfile"),
        ("build/Containerfile.ci", "dockerfile"),
        ("app.dockerfile", "dockerfile"),
        ("Gemfile", "ruby"),
        ("Rakefile", "ruby"),
        ("Vagrantfile", "ruby"),
        ("Pipfile", "toml"),
        ("README", "text"),
        ("LICENSE", "text"),
        ("COPYING", "text"),
        ("Cargo.lock", "toml"),
        ("home/.bashrc", "bash"),
        (".zshrc", "bash"),
        ("Jenkinsfile", "groovy"),
        ("BUILD.bazel", "starlark"),
        ("go.mod", "gomod"),
        ("Makefile.am", "make"),
        ("src/Makefile.inc", "make"),
    ],
)
def test_special_file_names(path: str, language: str) -> None:
    assert detect_language(path) == language


@pytest.mark.parametrize(
    ("first_line", "language"),
    [
        ("#!/usr/bin/env python3", "python"),
        ("\ufeff#!/usr/bin/env python3", "python"),  # after a byte-order mark
        ("#!/usr/bin/env -S python3 -u", "python"),
        ("#!/usr/bin/env -i PATH=/bin bash", "bash"),
        ("#!/usr/bin/env python", "python"),
        ("#!/usr/bin/python3.11", "python"),
        ("#! /usr/bin/python", "python"),
        ("#!/bin/bash", "bash"),
        ("#!/bin/sh -e", "bash"),
        ("#!/usr/bin/env zsh", "bash"),
        ("#!/usr/bin/env node", "javascript"),
        ("#!/usr/bin/env ruby", "ruby"),
        ("#!/usr/bin/perl -w", "perl"),
        ("#!/usr/bin/env -u PYTHONPATH python3", "python"),  # an option's argument
        ("#!/usr/bin/env -C /srv bash", "bash"),
        ("#!/usr/bin/env --split-string=python3 -u", "python"),
        ("#!/usr/bin/env php", "php"),
        ("#!/bin/ksh", "bash"),
        ("#!/bin/dash", "bash"),
        ("#!/usr/bin/env", "text"),
        ("#!/usr/bin/env unknown-interpreter", "text"),
        ("#!", "text"),
    ],
)
def test_shebang_of_a_file_without_extension(first_line: str, language: str) -> None:
    content = first_line + "\nbody\n"
    assert detect_language("bin/tool", content) == language
    assert detect_language("bin/tool", first_line) == language  # no newline at all


def test_shebang_must_be_on_the_first_line() -> None:
    assert detect_language("tool", "\n#!/usr/bin/env python3\n") == "text"
    assert detect_language("tool", "# comment\n#!/bin/bash\n") == "text"


def test_extension_wins_over_shebang() -> None:
    assert detect_language("script.rb", "#!/usr/bin/env python3\n") == "ruby"
    assert detect_language("notes.txt", "#!/bin/bash\n") == "text"


def test_special_name_wins_over_shebang() -> None:
    assert detect_language("Makefile", "#!/usr/bin/env python3\n") == "make"


@pytest.mark.parametrize("path", ["", "unknown", "file.unknownext", "archive.tar.gz", "x.",
                                  ".hidden", "dir/"])
def test_unknown_is_text(path: str) -> None:
    assert detect_language(path) == "text"
    assert detect_language(path, "just some words\n") == "text"


def test_doc_languages() -> None:
    assert {"markdown", "rst", "text"} == set(DOC_LANGUAGES)
    assert detect_language("README.md") in DOC_LANGUAGES
    assert detect_language("main.py") not in DOC_LANGUAGES


def test_structured_languages_have_outliners() -> None:
    """Every code or config language detect_language can name has a syntax outliner."""
    from retriever.ingest.chunking.syntax import OUTLINERS

    structured = {"python", "javascript", "typescript", "tsx", "go", "rust", "java", "c", "cpp",
                  "csharp", "ruby", "php", "kotlin", "bash", "yaml", "toml", "json",
                  "dockerfile", "make", "sql"}
    assert set(OUTLINERS) == structured
    paths = ["a.py", "a.js", "a.ts", "a.tsx", "a.go", "a.rs", "A.java", "a.c", "a.cpp", "a.cs",
             "a.rb", "a.php", "a.kt", "a.sh", "a.yaml", "a.toml", "a.json", "Dockerfile",
             "Makefile", "a.sql"]
    assert {detect_language(p) for p in paths} == structured


CPP_HEADER = """// Copyright 2011 The Authors.
#ifndef DB_ITER_H_
#define DB_ITER_H_

#include <cstdint>

namespace store {

class Iterator {
 public:
  Iterator();
  virtual ~Iterator();
  virtual bool Valid() const = 0;

 private:
  int refs_;
};

}  // namespace store

#endif  // DB_ITER_H_
"""

C_HEADER = """#ifndef CJSON_H
#define CJSON_H

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cJSON {
    struct cJSON *next;
    int type;
    unsigned flags : 2; /* a bit-field, not a base class */
} cJSON;

/* the class of a value: see cJSON_Invalid */
int cJSON_GetClass(const cJSON *item);

#ifdef __cplusplus
}
#endif

#endif
"""


@pytest.mark.parametrize(
    ("content", "language"),
    [
        (CPP_HEADER, "cpp"),
        (C_HEADER, "c"),  # extern "C" and __cplusplus guards make a C header, not C++
        ("template <typename T>\nT max(T a, T b);\n", "cpp"),
        ("struct Bar final : public Foo {};\n", "cpp"),
        ("class Foo {\n  int x;\n};\n", "cpp"),
        ("using namespace std;\n", "cpp"),
        ("void log(const std::string& line);\n", "cpp"),
        ("#include <vector>\n", "cpp"),
        ("#include <stdio.h>\nint main(void);\n", "c"),
        ("", "c"),
    ],
)
def test_a_dot_h_file_is_c_or_cpp_by_what_it_holds(content: str, language: str) -> None:
    assert detect_language("include/x.h", content) == language


def test_a_cpp_header_outlines_as_cpp_where_the_c_grammar_fails() -> None:
    """Why the content decides: read as C, a C++ header is a parse error and falls back to
    windows; read as what it is, it outlines (its namespace is a unit)."""
    from retriever.ingest.chunking.outline import Fallback
    from retriever.ingest.chunking.syntax import OUTLINERS

    with pytest.raises(Fallback):
        OUTLINERS["c"](CPP_HEADER)
    language = detect_language("db/db_iter.h", CPP_HEADER)
    units = OUTLINERS[language](CPP_HEADER)
    assert ("namespace", "namespace store") in [(u.kind, u.name) for u in units]
