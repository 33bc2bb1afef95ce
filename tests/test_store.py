from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from routerretriever import DenseRetriever, Document, embed_corpus, evaluate_retriever, load_beir
from routerretriever.files import atomic_write
from routerretriever.onnx_encoder import PROBES
from routerretriever.runtime import planned_runtime
from routerretriever.store import SPOT_CHECKS


class CountingEncoder:
    """An encoder, counting how many texts it embeds."""

    def __init__(self, encoder):
        self._encoder, self.texts = encoder, 0

    def __getattr__(self, name):
        return getattr(self._encoder, name)

    def encode(self, texts, **kwargs):
        self.texts += len(texts)
        return self._encoder.encode(texts, **kwargs)


def test_second_evaluation_reuses_cached_corpus_embeddings(tiny_encoder, tiny, tmp_path):
    ds = load_beir(tiny)
    counting = CountingEncoder(tiny_encoder)
    retriever = DenseRetriever(counting, cache_dir=tmp_path / "cache")
    first = evaluate_retriever(retriever, ds)
    # a fast runtime (bfloat16, ONNX) is checked against float32 on the probes first
    probes = 0 if planned_runtime(tiny_encoder) == "torch" else 2 * len(PROBES)
    assert counting.texts == len(ds.corpus) + len(ds.queries) + probes
    assert retriever.corpus_from_cache is False

    counting.texts = 0
    again = DenseRetriever(counting, cache_dir=tmp_path / "cache")
    second = evaluate_retriever(again, load_beir(tiny))
    # Only the queries were encoded, and the few rows spot-checked against their documents.
    assert counting.texts == len(ds.queries) + SPOT_CHECKS
    assert again.corpus_from_cache is True
    assert second.scores == first.scores
    assert len(list((tmp_path / "cache" / "corpus").glob("*.npz"))) == 1


def test_changed_corpus_is_re_encoded(tiny_encoder, tmp_path):
    corpus = {"a": Document("alpha"), "b": Document("beta")}
    first = embed_corpus(tiny_encoder, corpus, cache_dir=tmp_path)
    corpus["b"] = Document("gamma")
    second = embed_corpus(tiny_encoder, corpus, cache_dir=tmp_path)
    assert not second.cached
    assert not np.allclose(first.embeddings[1], second.embeddings[1])
    assert embed_corpus(tiny_encoder, corpus, cache_dir=tmp_path).cached


def test_corrupt_cache_file_is_rebuilt(tiny_encoder, tmp_path, caplog):
    corpus = {"a": Document("alpha"), "b": Document("beta")}
    first = embed_corpus(tiny_encoder, corpus, cache_dir=tmp_path)
    (path,) = (tmp_path / "corpus").glob("*.npz")
    path.write_bytes(path.read_bytes()[:100])  # as if cut short
    again = embed_corpus(tiny_encoder, corpus, cache_dir=tmp_path)
    assert not again.cached and "re-encoding" in caplog.text
    np.testing.assert_allclose(again.embeddings, first.embeddings, atol=1e-6)
    assert embed_corpus(tiny_encoder, corpus, cache_dir=tmp_path).cached


def test_killed_write_leaves_no_file(tmp_path: Path):
    target = tmp_path / "x.npz"

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, write)
    assert list(tmp_path.iterdir()) == []


def test_replacing_a_folder_is_one_step_and_a_half_done_one_is_recovered(tmp_path):
    from routerretriever.files import atomic_dir, recover_dir

    target = tmp_path / "expert"
    atomic_dir(target, lambda tmp: (tmp / "v").write_text("1"))
    atomic_dir(target, lambda tmp: (tmp / "v").write_text("2"))
    assert (target / "v").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["expert"]  # nothing left aside
    # A replacement by two renames killed between them (where folders cannot be swapped).
    target.rename(tmp_path / ".expert.old-123")
    recover_dir(target)
    assert (target / "v").read_text() == "2"
    target.rename(tmp_path / ".expert.old-456")
    atomic_dir(target, lambda tmp: (tmp / "v").write_text("3"))  # a later write recovers first
    assert (target / "v").read_text() == "3"
    assert [p.name for p in tmp_path.iterdir()] == ["expert"]


def test_a_cache_file_that_parses_but_lies_is_not_trusted(tiny_encoder, tiny, tmp_path):
    corpus = load_beir(tiny).corpus
    first = embed_corpus(tiny_encoder, corpus, cache_dir=tmp_path)
    (path,) = (tmp_path / "corpus").glob("*.npz")
    for tamper in (lambda e: e[::-1].copy(), lambda e: np.full_like(e, np.nan)):
        np.savez(path, ids=np.array(first.ids, dtype=str), embeddings=tamper(first.embeddings))
        again = embed_corpus(tiny_encoder, corpus, cache_dir=tmp_path)
        assert again.cached is False  # re-encoded, not read
        np.testing.assert_allclose(again.embeddings, first.embeddings, atol=1e-5)
    assert embed_corpus(tiny_encoder, corpus, cache_dir=tmp_path).cached is True
