"""The embedder's precisions, token-budgeted batches and precision-independent compatibility."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_settings
from hypothesis import given, settings
from hypothesis import strategies as st

from retriever.client import RetrieverClient, pb
from retriever.config import Settings
from retriever.ingest.chunking.structure import StructuredChunker, _TokenSpans
from retriever.ingest.pipeline import service_chunkers
from retriever.models.embedder import (
    Embedder,
    _batches,
    _bucket_rows,
    _bucket_width,
    check_precision,
    compatibility_key,
    cpu_has_bf16,
    revision_name,
)
from retriever.server.app import ServerThread

ROOT = Path(__file__).resolve().parent.parent


def real_chunks() -> list[str]:
    """Slices of this project's own sources, of every length up to a full chunk."""
    out = []
    for p in sorted((ROOT / "retriever").rglob("*.py"))[:40]:
        t = p.read_text()
        out += [t[:1200], t[:300], t[:60]]
    return [t for t in out if t.strip()]


def test_batches_respect_the_token_budget_and_the_cap() -> None:
    lengths = [256, 200, 120, 100, 60, 60, 30, 10, 5, 5]
    order = list(range(len(lengths)))  # already longest first
    batches = _batches(order, lengths, cap=4, budget=512)
    assert [i for idx, _ in batches for i in idx] == order  # every row once, in order
    for idx, width in batches:
        assert idx and width == lengths[idx[0]]
        assert len(idx) <= 4
        assert len(idx) == 1 or len(idx) * width <= 512
    # Short rows share a batch, long ones do not: 256 alone, the 5-token ones together.
    assert batches[0][0] == [0, 1] and batches[-1][0][-1] == 9
    # A row longer than the budget still runs, alone.
    assert _batches([0, 1], [900, 10], cap=8, budget=100) == [([0], 900), ([1], 10)]


def test_token_budgeted_batches_embed_like_one_text_at_a_time(embedder: Embedder) -> None:
    texts = real_chunks()
    batched = embedder.embed(texts, batch_size=64, batch_tokens=4096)
    single = np.stack([embedder.embed([t], batch_size=1)[0] for t in texts[:24]])
    cos = np.sum(batched[:24] * single, axis=1)
    assert cos.min() > 0.9999
    assert np.allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)


def test_a_pass_on_one_thread_embeds_alike_and_restores_the_thread_count(
        embedder: Embedder) -> None:
    """query_threads: a query batch may run on fewer intra-op threads than documents; the
    vectors agree and the count documents run with is put back."""
    import torch

    texts = real_chunks()[:8]
    before = torch.get_num_threads()
    other = 1 if before > 1 else 2
    seen: list[int] = []
    hook = embedder._model.register_forward_hook(  # type: ignore[union-attr]
        lambda *_: seen.append(torch.get_num_threads()))
    try:
        fewer = embedder.embed(texts, batch_size=8, threads=other)
    finally:
        hook.remove()
    assert seen and set(seen) == {other} and torch.get_num_threads() == before
    assert np.sum(fewer * embedder.embed(texts, batch_size=8), axis=1).min() > 0.9999


def test_queries_run_between_a_document_slices_layers_with_unchanged_vectors(
        embedder: Embedder) -> None:
    """The real model's layer checkpoints: queries sent while full-length chunks are being
    embedded one per slice are answered inside those slices (between two layers), and
    neither the queries' vectors nor the chunks' differ from embedding each alone."""
    import time

    from retriever.models.batcher import MicroBatcher

    docs = [t for t in real_chunks() if len(t) >= 1000][:8]
    queries = [f"where is {w} handled" for w in ("retry", "deadline", "snapshot", "lexical",
                                                  "catalog", "namespace", "chunk", "search")]
    b = MicroBatcher(lambda t: embedder.embed(t, batch_size=max(1, len(t))), 64, 0.0,
                     doc_batch=1, doc_slice_tokens=embedder.max_tokens)
    assert embedder.add_checkpoint(b.checkpoint)  # the torch model's layers were found
    b.start()
    try:
        job = b.submit_documents(docs, [embedder.max_tokens] * len(docs))
        futures = []
        for q in queries:  # spread over the job's ~8 slices
            futures.append(b.submit([q]))
            time.sleep(0.02)
        got = [f.result(60)[0] for f in futures]
        vectors = job.result(60)
    finally:
        b.stop()
        embedder.remove_checkpoint(b.checkpoint)
    assert b.checkpoint_batches >= 1
    alone = embedder.embed(queries, batch_size=1)
    assert np.sum(np.stack(got) * alone, axis=1).min() > 0.9999
    assert np.sum(vectors * embedder.embed(docs, batch_size=1), axis=1).min() > 0.9999


def test_bucketed_shapes_embed_like_exact_ones(embedder: Embedder, tmp_path: Path) -> None:
    """Padding a batch to a warmed shape (rows repeated, width padded with masked tokens)
    changes no vector; the warm-up runs every shape a batch can take."""
    assert [_bucket_rows(n) for n in (1, 2, 3, 5, 33, 64)] == [1, 2, 4, 8, 64, 64]
    assert [_bucket_width(w, 256) for w in (1, 9, 17, 25, 32, 33, 250, 256)] == [
        8, 16, 24, 32, 32, 64, 256, 256]
    assert _bucket_width(300, 256) == 300 and _bucket_width(120, 100) == 120
    bucketed = Embedder(make_settings(tmp_path, embed_bucket_shapes=True, embed_batch_size=4,
                                      query_batch_size=4))
    bucketed.load()
    assert bucketed._buckets and not embedder._buckets  # off on CPU by default
    texts = real_chunks()[:30]
    a, b = embedder.embed(texts, batch_size=3), bucketed.embed(texts, batch_size=3)
    assert np.sum(a * b, axis=1).min() > 0.9999
    # on CUDA it runs at load: 11 widths (8, 16, 24, 32..256) x rows 1, 2, 4 (batches of 4)
    assert bucketed._warm_shapes() == 11 * 3


def test_revision_names_the_precision_and_compatibility_ignores_it() -> None:
    assert revision_name("80bc779a287d", "fp32") == "80bc779a287d"
    assert revision_name("80bc779a287d", "fp16") == "80bc779a287d+fp16"
    assert compatibility_key("80bc779a287d+bf16") == compatibility_key("80bc779a287d")


def test_precisions_a_device_cannot_run_are_refused_with_what_to_set() -> None:
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        check_precision("cpu", "fp16")
    with pytest.raises(ValueError, match="one of auto, fp32, fp16, bf16"):
        check_precision("cuda", "int4")
    check_precision("cuda", "bf16")
    if not cpu_has_bf16():
        with pytest.raises(ValueError, match="emulated"):
            check_precision("cpu", "bf16")


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bf16 "
                    "(avx512_bf16/AMX): bf16 is refused here, as the test above checks")
def test_bf16_agrees_with_fp32_and_serves_a_namespace_fp32_built(tmp_path: Path,
                                                                  embedder: Embedder) -> None:
    bf16 = Embedder(Settings(embedder_precision="bf16"))
    bf16.load()
    assert bf16.precision == "bf16"
    assert bf16.revision == f"{embedder.revision}+bf16"
    texts = real_chunks()
    cos = np.sum(embedder.embed(texts) * bf16.embed(texts), axis=1)
    assert cos.mean() >= 0.99 and cos.min() >= 0.98

    settings = make_settings(tmp_path / "data")
    docs = [pb.Document(doc_id=f"d{i}", path=f"src/m{i}.py", content=t)
            for i, t in enumerate(texts[:30:3])]
    with_fp32 = ServerThread(settings, embedder).start()
    try:
        with RetrieverClient(with_fp32.address) as c:
            c.upsert("code", docs)
            before = [h.chunk.chunk_id for h in c.search("code", texts[3][:200], top_k=3).hits]
    finally:
        with_fp32.stop()
    with_bf16 = ServerThread(settings, bf16).start()
    try:
        with RetrieverClient(with_bf16.address) as c:
            resp = c.search("code", texts[3][:200], top_k=3)
            assert resp.lineage.embedder_revision == bf16.revision
            assert [h.chunk.chunk_id for h in resp.hits][0] == before[0]
            # What fp32 indexed stays UNCHANGED (one vector class: nothing re-embedded),
            # and it writes to the namespace too.
            again = c.upsert("code", docs[:2])
            assert (again.documents_unchanged, again.chunks_embedded) == (2, 0)
            c.upsert("code", [pb.Document(doc_id="new", path="src/new.py", content=texts[0])])
            status = c.status("code")
            assert status.document_count == len(docs) + 1
            # The namespace's builder and the embedder serving it, each by its revision.
            assert status.embedder_revision == embedder.revision
            assert (status.serving_embedder_revision, status.precision) == (
                bf16.revision, "bf16")
    finally:
        with_bf16.stop()


# Pieces text is drawn from: what makes tokenizers differ (punctuation, non-ASCII spaces,
# control characters BERT drops, combining marks, CJK, emoji, words over 100 characters).
_PIECES = ("def", "parse_config", "(", ")", "::", "naïve", "Ünïcödé", "e\u0301", "中文字",
           "🙂", "x" * 120, "\u00a0", "\u2003", "\x0c", "\x0b", "\x00", "\u200b", " ", "  ",
           "\t", "\n", "\r\n", "'", '"', "ﬁ", "İ", "tokenization", "##", "[UNK]", "1.5e-3")


# Plain ASCII (counted a word at a time, see _AsciiWords): every printable character.
_ASCII = st.one_of(
    st.text(st.sampled_from([chr(c) for c in range(32, 127)] + ["\t", "\n", "\r"]),
            max_size=200),
    st.lists(st.sampled_from([p for p in _PIECES if p.isascii() and p.isprintable()
                              or p in (" ", "  ", "\t", "\n", "\r\n")]),
             max_size=40).map("".join))
_TEXT = st.one_of(_ASCII, st.lists(st.sampled_from(_PIECES), max_size=30).map("".join))


def _wrapper_counts(embedder: Embedder, texts: list[str]) -> list[int]:
    """Token counts through the transformers wrapper (the reference the fast path keeps)."""
    ids = embedder._tokenizer()(texts, add_special_tokens=False)["input_ids"]
    return [len(x) for x in ids]


@settings(max_examples=150, deadline=None)
@given(st.lists(_TEXT, min_size=1, max_size=6))
def test_token_counts_and_offsets_match_the_tokenizers_wrapper(embedder: Embedder,
                                                               texts: list[str]) -> None:
    assert embedder.count_tokens(texts) == _wrapper_counts(embedder, texts)
    enc = embedder._tokenizer()(texts, add_special_tokens=False, return_offsets_mapping=True)
    assert embedder.token_offsets(texts) == [[tuple(o) for o in offs]
                                             for offs in enc["offset_mapping"]]


@settings(max_examples=150, deadline=None)
@given(_TEXT.filter(bool),
       st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 10_000)), min_size=1,
                max_size=12))
def test_span_counts_from_one_tokenisation_equal_counting_each_span_alone(
        embedder: Embedder, text: str, cuts: list[tuple[int, int]]) -> None:
    """What the structured chunker packs with: exact in the model's tokenizer for any span,
    from the whole text's token offsets where both ends touch whitespace."""
    spans = [tuple(sorted((a % (len(text) + 1), b % (len(text) + 1)))) for a, b in cuts]
    spans += [(0, len(text))]
    chunker = service_chunkers(Settings(), embedder).chunker_for("python")
    assert isinstance(chunker, StructuredChunker)
    got = _TokenSpans(text, chunker._token_positions(text), embedder.count_tokens).counts(spans)
    assert got == _wrapper_counts(embedder, [text[a:b] for a, b in spans])


def test_word_counts_remember_names_not_blobs_and_stop_at_the_cap(
        embedder: Embedder, monkeypatch: pytest.MonkeyPatch) -> None:
    words = embedder._words
    assert words is not None  # the packaged tokenizer is BERT's
    blob = "QUJD" * 1250  # 5,000 characters of base64, one word
    text = f"value = {blob} + other_name\n"
    assert embedder.count_tokens([text]) == _wrapper_counts(embedder, [text])
    assert blob not in words._known and "other" in words._known
    monkeypatch.setattr(type(words), "CAP", len(words._known))
    new = "brandnewword one_more_unseen_word"
    assert embedder.count_tokens([new]) == _wrapper_counts(embedder, [new])
    assert "brandnewword" not in words._known


# Long texts too: the model truncates at its max length, and padding follows the longest.
_FEATURE_TEXT = st.one_of(_TEXT, st.lists(_TEXT, min_size=10, max_size=40).map(" ".join))


@settings(max_examples=100, deadline=None)
@given(st.lists(_FEATURE_TEXT, min_size=1, max_size=8))
def test_features_from_the_rust_tokenizer_equal_the_models_own_preprocessing(
        embedder: Embedder, texts: list[str]) -> None:
    """What every pass feeds the model (the fast path the packaged model runs on)."""
    assert embedder._feature_tokenizer is not None
    want = embedder._model.preprocess(texts)
    got = embedder._features(texts)
    assert set(got) == {"input_ids", "attention_mask", "token_type_ids"}
    for k, v in got.items():
        assert v.dtype == np.int64
        np.testing.assert_array_equal(v, want[k].numpy())


def test_a_tokenizer_that_does_not_reproduce_the_preprocessing_is_not_used(
        embedder: Embedder) -> None:
    """The check at load refuses a tokenizer set otherwise than the model's preprocessing
    (here: truncating shorter), so the model's own preprocessing runs instead."""
    from retriever.models.embedder import _feature_tokenizer

    assert _feature_tokenizer(embedder._model, embedder._count_tokenizer,
                              embedder.max_tokens) is not None
    assert _feature_tokenizer(embedder._model, embedder._count_tokenizer,
                              embedder.max_tokens - 1) is None
    texts = ["a query", "word " * 400]
    vectors = embedder.embed(texts)
    fast, embedder._feature_tokenizer = embedder._feature_tokenizer, None
    try:
        reference = embedder.embed(texts)
    finally:
        embedder._feature_tokenizer = fast
    np.testing.assert_array_equal(vectors, reference)
