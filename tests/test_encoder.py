from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routerretriever import Encoder, ModelError
from routerretriever.encoder import default_model_path

TEXTS = [
    "Aspirin lowers the risk of heart attack.",
    "The wing was tested in a supersonic wind tunnel at Mach 2.",
    "short",
    "Libraries classify books by subject " * 20,
]


def test_shape_dtype_and_normalised(encoder):
    emb = encoder.encode(TEXTS)
    assert emb.shape == (4, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert encoder.settings.similarity == "cosine" and encoder.settings.max_length == 256


def test_output_independent_of_order_and_batch_size(encoder):
    emb = encoder.encode(TEXTS, batch_size=2)
    rev = encoder.encode(TEXTS[::-1], batch_size=3)[::-1]
    np.testing.assert_allclose(emb, rev, atol=1e-5)
    np.testing.assert_array_equal(emb, encoder.encode(TEXTS, batch_size=2))  # deterministic


def test_matches_sentence_transformers(encoder):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(default_model_path(), device="cpu")
    np.testing.assert_allclose(encoder.encode(TEXTS), st.encode(TEXTS), atol=1e-5)


def test_empty_input(encoder):
    assert encoder.encode([]).shape == (0, 384)


def contriever_style_copy(tmp_path: Path) -> Path:
    """The same weights without sentence-transformers files, as Contriever ships."""
    src, dst = Path(default_model_path()), tmp_path / "plain"
    dst.mkdir()
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "special_tokens_map.json",
    ):
        (dst / name).symlink_to(src / name)
    return dst


def test_folder_without_st_config_means_mean_pooling_dot_product(tmp_path, encoder):
    plain = Encoder.load(contriever_style_copy(tmp_path))
    assert plain.settings.pooling == "mean"
    assert plain.settings.normalize is False and plain.settings.similarity == "dot"
    emb = plain.encode(TEXTS[:2])
    assert not np.allclose(np.linalg.norm(emb, axis=1), 1.0)  # really unnormalised
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    np.testing.assert_allclose(unit, encoder.encode(TEXTS[:2]), atol=1e-5)
    assert plain.fingerprint != encoder.fingerprint


def test_overrides(tmp_path):
    enc = Encoder.load(pooling="cls", normalize=False, max_length=8)
    assert (enc.settings.pooling, enc.settings.normalize, enc.settings.max_length) == (
        "cls",
        False,
        8,
    )
    assert enc.settings.similarity == "dot"
    with pytest.raises(ValueError, match="pooling must be"):
        Encoder.load(pooling="avg")  # type: ignore[arg-type]


def test_pickle_only_folder_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(Path(default_model_path()) / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelError, match=r"pytorch_model\.bin.*pickle formats are refused"):
        Encoder.load(folder)


def test_missing_folder(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        Encoder.load(tmp_path / "nope")


def test_cut_variant_pools_the_states_of_its_first_layers(encoder):
    import torch

    full = encoder.encode(TEXTS)
    batch = encoder.collate(encoder.tokenize(TEXTS[:2]))
    with torch.inference_mode():
        states = encoder.model(**batch, output_hidden_states=True).hidden_states
    for k in (1, 3):
        want = encoder.pool(states[k], batch["attention_mask"]).cpu().numpy()
        np.testing.assert_allclose(encoder.encode(TEXTS[:2], layers=k), want, atol=1e-5)
    # The cut shares weights but leaves the base model whole.
    assert len(encoder.model.encoder.layer) == encoder.num_layers == 6
    np.testing.assert_array_equal(encoder.encode(TEXTS), full)
    with pytest.raises(ValueError, match=r"layers must be in 1\.\.6"):
        encoder.encode(TEXTS, layers=7)
    with pytest.raises(ValueError, match="base model only"):
        encoder.encode(TEXTS, layers=2, model=encoder.model)


def test_bfloat16_variant_is_close_to_float32(encoder):
    import torch

    full = encoder.encode(TEXTS)
    low = encoder.encode(TEXTS, dtype=torch.bfloat16)
    assert low.dtype == np.float32
    assert not np.array_equal(low, full)  # it really ran in bfloat16
    assert (np.sum(low * full, axis=1) > 0.999).all()
    assert encoder.model.dtype == torch.float32


def test_without_a_terminal_long_encodings_log_progress(tiny_encoder, monkeypatch, caplog):
    import logging

    import routerretriever.encoder as encoder_module

    monkeypatch.setattr(encoder_module, "LOG_EVERY_S", 0.0)
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    caplog.set_level(logging.INFO, logger="routerretriever.encoder")
    tiny_encoder.encode([f"text number {i}" for i in range(40)], batch_size=8, desc="corpus")
    lines = [r.getMessage() for r in caplog.records if "corpus:" in r.getMessage()]
    assert lines and lines[0].startswith("corpus: 8 of 40 texts")


def test_tokenize_from_many_threads_at_once(encoder):
    """A server tokenizes from several threads (model workers, /v1/embeddings). Unguarded,
    Hugging Face's fast tokenizer lets one call's truncation length leak into another's."""
    from concurrent.futures import ThreadPoolExecutor

    texts = [f"query {i} " + "word " * (i % 40) for i in range(64)]
    jobs = [(texts[i:] + texts[:i], 8 + i % 24) for i in range(48)]
    expected = [encoder.tokenize(t, n) for t, n in jobs]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda job: encoder.tokenize(*job), jobs))
    assert got == expected


def test_loading_prints_nothing_and_leaves_the_callers_bar_setting(capfd):
    """transformers draws a "Loading weights" bar on every load; a library call does not print."""
    from transformers.utils import logging as hf_logging

    from routerretriever.encoder import Encoder

    for shown in (True, False):
        (hf_logging.enable_progress_bar if shown else hf_logging.disable_progress_bar)()
        Encoder.load()
        assert hf_logging.is_progress_bar_enabled() is shown
    hf_logging.enable_progress_bar()
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.integers(1, 12), st.sampled_from([None, "a", "b", "c"])), max_size=120
    ),
    size=st.integers(1, 16),
)
def test_expert_batches_cover_every_row_once_and_give_whole_batches_one_expert(rows, size):
    """On a GPU, batches of one expert wherever an expert's rows fill them (mixed ones cost a
    third of a pass there); every row exactly once, none over ``size``, at most one batch more
    per expert. On a CPU, mixed batches cut by length alone."""
    from routerretriever.batch_plan import expert_batches, length_batches, plan_batches

    ids = [[0] * n for n, _ in rows]
    names = [e for _, e in rows]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    got = expert_batches(ids, order, names, size)
    assert plan_batches(ids, order, names, size, "cuda") == got
    assert plan_batches(ids, order, names, size, "cpu") == length_batches(ids, order, size)
    assert sorted(i for b in got for i in b) == list(range(len(rows)))
    assert all(0 < len(b) <= size for b in got)
    assert len(got) <= len(length_batches(ids, order, size)) + len(set(names))
    if len({len(x) for x in ids}) == 1:  # no padding cut: each expert's whole batches are its own
        for e in set(names):
            own = sum(1 for b in got if len(b) == size and {names[i] for i in b} == {e})
            assert own >= names.count(e) // size
