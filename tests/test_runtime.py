"""The corpus side's runtimes: bfloat16 gives float32's vectors to the bar, caches never mix,
"auto" takes bfloat16 only where it is native, and a pass that disagrees is never used."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routerretriever import Document, Encoder, embed_corpus
from routerretriever import runtime as rt
from routerretriever.runtime import BACKENDS, MIN_COSINE, corpus_runtime, planned_runtime
from tests.conftest import tiny_model_path

TEXTS = [
    "short",
    "a somewhat longer text about retrieval with experts",
    "Mixtures of LoRA experts over one frozen base model, routed per query by pilot embeddings. "
    * 8,  # truncated at the encoder's max length
    "",
]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_bfloat16_autocast_gives_float32s_vectors_to_the_bar(encoder, tmp_path):
    """The real model, batches with padding: what the corpus cache would hold."""
    runtime = corpus_runtime(encoder, tmp_path, "bfloat16")
    assert runtime.name == "bfloat16" and runtime.autocast == torch.bfloat16
    ref = encoder.encode(TEXTS, batch_size=3, show_progress=False)
    got = runtime.encode(encoder, TEXTS, batch_size=3, show_progress=False)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert cosines(ref, got).min() >= MIN_COSINE
    assert not np.array_equal(ref, got)  # it did run in bfloat16


def test_autocast_is_only_for_the_torch_model_in_float32(tiny_encoder):
    with pytest.raises(ValueError, match="autocast applies"):
        tiny_encoder.encode(["x"], autocast=torch.bfloat16, dtype=torch.bfloat16)


def test_each_runtime_reads_only_its_own_cache_file(tiny_encoder, tmp_path, monkeypatch):
    corpus = {f"d{i}": Document(text=t or "empty") for i, t in enumerate(TEXTS)}
    ref = embed_corpus(tiny_encoder, corpus, cache_dir=tmp_path, backend="torch")
    fast = embed_corpus(tiny_encoder, corpus, cache_dir=tmp_path, backend="bfloat16")
    assert not fast.cached and fast.backend == "bfloat16"  # the torch file does not answer
    assert sorted(p.name.endswith("-bfloat16.npz") for p in (tmp_path / "corpus").iterdir()) == [
        False,
        True,
    ]
    assert cosines(ref.embeddings, fast.embeddings).min() >= MIN_COSINE
    again = embed_corpus(tiny_encoder, corpus, cache_dir=tmp_path, backend="bfloat16")
    assert again.cached  # the float32 spot check accepts bfloat16's rounding
    np.testing.assert_array_equal(again.embeddings, fast.embeddings)

    # Where bfloat16 is native, "auto" plans it: its own file first, then the reference file.
    monkeypatch.setattr(rt, "has_fast_bfloat16", lambda device="cpu": True)
    assert planned_runtime(tiny_encoder) == "bfloat16"
    auto = embed_corpus(tiny_encoder, corpus, cache_dir=tmp_path, backend="auto")
    assert auto.cached and auto.backend == "bfloat16"
    other = {"x": Document(text="a document only the torch file holds")}
    embed_corpus(tiny_encoder, other, cache_dir=tmp_path, backend="torch")
    auto = embed_corpus(tiny_encoder, other, cache_dir=tmp_path, backend="auto")
    assert auto.cached and auto.backend == "torch"
    new = {"y": Document(text="a document no file holds")}
    made = embed_corpus(tiny_encoder, new, cache_dir=tmp_path, backend="auto")
    assert made.backend == "bfloat16" and not made.cached


def test_auto_takes_bfloat16_only_where_it_is_native(tiny_encoder, monkeypatch):
    monkeypatch.setattr(rt, "has_fast_bfloat16", lambda device="cpu": False)
    assert planned_runtime(tiny_encoder) in ("onnx", "torch")
    assert planned_runtime(tiny_encoder, "bfloat16") == "bfloat16"
    with pytest.raises(ValueError, match="backend must be one of auto, torch, onnx, bfloat16"):
        planned_runtime(tiny_encoder, "fp8")  # type: ignore[arg-type]


def test_a_bfloat16_pass_that_disagrees_is_an_error_when_asked_for_and_skipped_otherwise(
    tmp_path, monkeypatch, caplog
):
    enc = Encoder.load(tiny_model_path())  # a fresh encoder: nothing measured for it yet
    monkeypatch.setattr(rt, "MIN_COSINE", 1.01)  # no pass can reach it
    monkeypatch.setattr(rt, "has_fast_bfloat16", lambda device="cpu": True)
    with pytest.raises(RuntimeError, match="bfloat16 path cannot be used"):
        corpus_runtime(enc, tmp_path, "bfloat16")
    with caplog.at_level(logging.INFO, logger="routerretriever.runtime"):
        fallback = corpus_runtime(enc, tmp_path, "auto")
    assert fallback.name in ("onnx", "torch") and "not encoding in bfloat16" in caplog.text
    corpus = {"a": Document(text="one text"), "b": Document(text="another")}
    emb = embed_corpus(enc, corpus, cache_dir=tmp_path, backend="auto")
    assert emb.backend == fallback.name
    assert not list((tmp_path / "corpus").glob("*-bfloat16.npz"))


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    texts=st.lists(st.text(max_size=120), min_size=1, max_size=7),
    batch_size=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_bfloat16_rows_do_not_depend_on_order_or_batching(tiny_encoder, texts, batch_size, seed):
    """Any texts, any batch size, any order: each row is its own text's vector (bfloat16 rounds
    differently with other padding, so within the bar, not bit for bit)."""
    runtime = rt.BFLOAT16
    whole = runtime.encode(tiny_encoder, texts, batch_size=8, show_progress=False)
    order = np.random.default_rng(seed).permutation(len(texts))
    shuffled = runtime.encode(
        tiny_encoder, [texts[i] for i in order], batch_size=batch_size, show_progress=False
    )
    assert np.isfinite(shuffled).all()
    assert cosines(whole[order], shuffled).min() >= 0.999


@given(name=st.text(max_size=200))
def test_any_backend_name_is_planned_or_refused_without_echoing_it_in_bulk(tiny_encoder, name):
    try:
        plan = planned_runtime(tiny_encoder, name)  # type: ignore[arg-type]
    except ValueError as e:
        assert name not in BACKENDS and len(str(e)) < 120
    else:
        assert name in BACKENDS and plan in ("torch", "onnx", "bfloat16")
