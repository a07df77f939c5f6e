"""The code-aware analyzer: identifiers whole and split, prose stemmed, one for both sides."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from retriever.analyzer import analyze_all, query_terms, terms


def test_snake_case_is_kept_whole_and_split() -> None:
    t = terms("def parse_config(path):")
    assert "parse_config" in t and "pars" in t and "config" in t and "path" in t


def test_camel_case_and_acronyms_split_at_boundaries() -> None:
    assert {"httperror", "http", "error"} <= set(terms("raise HTTPError"))
    assert {"parsejson", "pars", "json"} <= set(terms("parseJSON"))
    assert {"xmlhttprequest", "xml", "http", "request"} <= set(terms("XMLHttpRequest"))


def test_dotted_names_and_paths() -> None:
    assert {"urllib.parse", "urllib", "pars"} <= set(terms("import urllib.parse"))
    t = set(terms("src/app/main.py"))
    assert {"src", "app", "main.py", "main", "py"} <= t


def test_prose_is_stemmed_and_stop_words_dropped() -> None:
    assert terms("The configs were parsed") == ["config", "pars"]
    # a query in words meets the identifier's parts
    assert set(query_terms("parsing configuration")) & set(terms("parse_config"))


def test_queries_and_documents_share_the_analyzer() -> None:
    doc = "class SessionManager:\n    def get_user_by_id(self, user_id): ..."
    for q in ("SessionManager", "get_user_by_id", "session manager", "user id"):
        assert set(query_terms(q)) <= set(terms(doc)), q


def test_accents_fold_and_unicode_words_survive() -> None:
    assert terms("Café naïve") == terms("cafe naive")
    assert "東京" in terms("東京 tower") or "東京" in "".join(terms("東京 tower"))


def test_query_terms_are_distinct_and_bounded() -> None:
    assert query_terms("error error ERROR") == ["error"]
    assert len(query_terms(" ".join(f"w{i}" for i in range(500)))) == 64


@given(st.text(max_size=300))
def test_terms_never_raise_and_are_fts_safe(text: str) -> None:
    for term in terms(text):
        assert term and " " not in term and '"' not in term
        assert len(term) <= 64
    assert analyze_all([text])[0] == " ".join(terms(text))
