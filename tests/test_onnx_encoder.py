"""The corpus side on ONNX Runtime: the same vectors as torch, its own cache files, safe exports."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from routerretriever import (
    DenseRetriever,
    Document,
    Encoder,
    embed_corpus,
    evaluate_retriever,
    load_beir,
)
from routerretriever.onnx_encoder import (
    MIN_COSINE,
    export_onnx,
    onnx_model,
    onnx_path,
    onnx_usable,
)
from tests.conftest import tiny_model_path


# ONNX Runtime runs on the CPU: these tests hold CPU encoders on a machine with a GPU too.
@pytest.fixture(scope="module")
def encoder():
    return Encoder.load(device="cpu")


@pytest.fixture(scope="module")
def tiny_encoder():
    return Encoder.load(tiny_model_path(), device="cpu")


TEXTS = [
    "short",
    "a somewhat longer text about retrieval with experts",
    "Mixtures of LoRA experts over one frozen base model, routed per query by pilot embeddings. "
    * 8,  # truncated at the encoder's max length
    "",
]


def test_the_onnx_graph_gives_torchs_vectors(encoder, tmp_path):
    model = onnx_model(encoder, tmp_path, "onnx")
    assert model is not None and model.path.name == onnx_path(encoder, tmp_path).name
    ref = encoder.encode(TEXTS, batch_size=3, show_progress=False)  # batches with padding
    got = encoder.encode(TEXTS, batch_size=3, show_progress=False, model=model)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert (ref * got).sum(axis=1).min() >= MIN_COSINE
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_an_explicit_runtime_reads_only_its_own_cache_file_and_auto_takes_the_reference(
    tiny_encoder, tmp_path
):
    corpus = {f"d{i}": Document(text=t or "empty") for i, t in enumerate(TEXTS)}
    ref = embed_corpus(tiny_encoder, corpus, cache_dir=tmp_path, backend="torch")
    fast = embed_corpus(tiny_encoder, corpus, cache_dir=tmp_path, backend="onnx")
    assert not ref.cached and not fast.cached  # the torch file does not answer an ONNX request
    files = sorted(p.name for p in (tmp_path / "corpus").glob("*.npz"))
    assert len(files) == 2 and sum(f.endswith("-onnx.npz") for f in files) == 1
    np.testing.assert_allclose(fast.embeddings, ref.embeddings, atol=1e-5)
    assert embed_corpus(tiny_encoder, corpus, cache_dir=tmp_path, backend="onnx").cached
    assert embed_corpus(tiny_encoder, corpus, cache_dir=tmp_path, backend="torch").cached
    # "auto" takes the torch reference file (e.g. one Ray filled) rather than encode again.
    other = {"x": Document(text="a document only the torch file holds")}
    embed_corpus(tiny_encoder, other, cache_dir=tmp_path, backend="torch")
    auto = embed_corpus(tiny_encoder, other, cache_dir=tmp_path, backend="auto")
    assert auto.cached and auto.backend == "torch"
    assert not embed_corpus(tiny_encoder, other, cache_dir=tmp_path, backend="onnx").cached


def test_a_broken_graph_is_an_error_when_asked_for_and_torch_otherwise(
    tmp_path, caplog, monkeypatch
):
    # "auto" meets the ONNX graph only on a CPU without native bfloat16 (else it takes bfloat16).
    monkeypatch.setattr("routerretriever.runtime.has_fast_bfloat16", lambda device="cpu": False)
    for backend in ("onnx", "auto"):
        enc = Encoder.load(tiny_model_path(), device="cpu")  # fresh: nothing loaded for it yet
        path = onnx_path(enc, tmp_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not an ONNX graph")
        if backend == "onnx":
            with pytest.raises(RuntimeError, match="ONNX Runtime path cannot be used"):
                onnx_model(enc, tmp_path, backend)
        else:
            with caplog.at_level(logging.INFO, logger="routerretriever.onnx_encoder"):
                assert onnx_model(enc, tmp_path, backend) is None
            assert "encoding with torch" in caplog.text
            corpus = {"a": Document(text="one text"), "b": Document(text="another")}
            emb = embed_corpus(enc, corpus, cache_dir=tmp_path, backend=backend)
            assert emb.backend == "torch" and not emb.cached
            np.testing.assert_allclose(
                emb.embeddings, enc.encode(["one text", "another"]), atol=1e-6
            )
            # A later run (a fresh encoder: nothing remembered) reuses the torch file.
            again = Encoder.load(tiny_model_path(), device="cpu")
            assert embed_corpus(again, corpus, cache_dir=tmp_path, backend=backend).cached


def test_a_killed_export_leaves_no_graph(tiny_encoder, tmp_path, monkeypatch):
    path = onnx_path(tiny_encoder, tmp_path)

    def dies(model, args, f, **kwargs):
        with open(f, "wb") as out:
            out.write(b"half a graph")
        raise KeyboardInterrupt  # what a kill mid-write looks like to the writer

    monkeypatch.setattr(torch.onnx, "export", dies)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(tiny_encoder, path)
    assert not path.exists() and not list(path.parent.glob("*"))


def test_backend_is_checked(tiny_encoder, tmp_path):
    with pytest.raises(ValueError, match="backend must be one of auto, torch, onnx"):
        onnx_model(tiny_encoder, tmp_path, "tensorrt")  # type: ignore[arg-type]
    assert onnx_model(tiny_encoder, tmp_path, "torch") is None
    assert not onnx_usable(tiny_encoder, "torch") and onnx_usable(tiny_encoder, "onnx")


def test_a_retriever_on_either_runtime_scores_the_same_through_either_door(tiny_encoder, tiny):
    """``index_corpus`` (our evaluation) and ``encode_corpus`` (what BEIR's toolkit calls) use
    the retriever's runtime alike; torch and ONNX Runtime give the same scores."""
    ds = load_beir(tiny)
    scores = {}
    for backend in ("torch", "onnx"):
        r = DenseRetriever(tiny_encoder, backend=backend, use_cache=False)
        scores[backend] = evaluate_retriever(r, ds).scores
        docs = list(ds.corpus.values())
        indexed = embed_corpus(tiny_encoder, ds.corpus, use_cache=False, backend=backend)
        assert indexed.backend == backend
        np.testing.assert_allclose(r.encode_corpus(docs), indexed.embeddings, atol=1e-6)
    for metric, value in scores["torch"].items():
        assert scores["onnx"][metric] == pytest.approx(value, abs=1e-4)
    with pytest.raises(ValueError, match="backend must be one of"):
        DenseRetriever(tiny_encoder, backend="cuda")  # type: ignore[arg-type]
