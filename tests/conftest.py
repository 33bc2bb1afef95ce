from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny"
DEMO = ROOT / "examples" / "demo"
SHARED_DATA = ROOT.parent / "shared" / "data"
PROBES = ["effects of statins on cancer", "wind tunnel tests of wings", "reading list"]


_TINY_MODEL: list[Path] = []


def tiny_model_path() -> Path:
    """A randomly initialised 3-layer, 32-wide BERT with MiniLM's tokenizer and sentence-
    transformers settings (mean pooling, normalised), made once per test process: the
    mechanics of adapters, routing, batching and the service run on it in milliseconds. Tests
    that assert retrieval quality use the real all-MiniLM-L6-v2 instead."""
    if not _TINY_MODEL:
        import json
        import tempfile

        import torch
        from transformers import BertConfig, BertModel

        from routerretriever.model_folder import default_model_path

        src = Path(default_model_path())
        dst = Path(tempfile.mkdtemp(prefix="rr-tiny-bert-"))
        config = BertConfig(
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=512,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            BertModel(config, add_pooling_layer=False).save_pretrained(dst, safe_serialization=True)
        for name in (
            "vocab.txt",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ):
            shutil.copy(src / name, dst / name)
        shutil.copytree(src / "1_Pooling", dst / "1_Pooling")
        shutil.copy(src / "modules.json", dst / "modules.json")
        (dst / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
        _TINY_MODEL.append(dst)
    return _TINY_MODEL[0]


def state_digest(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode() + v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """Two tiny experts trained on pseudo-queries of the fixture corpus, with different seeds.

    Returns the encoder used for training, the store folder, and per expert the in-memory PEFT
    model, its metadata and its embeddings of PROBES.
    """
    from routerretriever import Encoder
    from routerretriever.training import TrainConfig, fit_expert, load_training_set, save_expert

    enc = Encoder.load(tiny_model_path())
    base_digest = state_digest(enc.model)
    cache = tmp_path_factory.mktemp("cache")
    store = tmp_path_factory.mktemp("store")
    ts = load_training_set(enc, TINY, from_corpus=True, cache_dir=cache)
    out = {}
    for name, seed in (("alpha", 0), ("beta", 1)):
        cfg = TrainConfig(
            lr=2e-3,
            max_steps=16,
            eval_every=8,
            batch_size=8,
            hard_negatives=2,
            keep_best=False,
            max_query_length=32,
            seed=seed,
        )
        model, info = fit_expert(enc, [ts], name, train=cfg, show_progress=False)
        out[name] = (model, info, enc.encode(PROBES, model=model))
        save_expert(model, info, store)
    assert state_digest(enc.model) == base_digest  # training never touches the base encoder
    return enc, store, out


@pytest.fixture(scope="session")
def encoder():
    """The real all-MiniLM-L6-v2, loaded once per session (read-only in tests)."""
    from routerretriever import Encoder

    return Encoder.load()


@pytest.fixture(scope="session")
def tiny_encoder():
    """The tiny random BERT (:func:`tiny_model_path`) loaded once per session: for mechanics."""
    from routerretriever import Encoder

    return Encoder.load(tiny_model_path())


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """A writable copy of the tiny BEIR fixture."""
    dst = tmp_path / "tiny"
    shutil.copytree(TINY, dst)
    return dst


def shared_dataset(rel: str) -> Path:
    path = SHARED_DATA / rel
    if not path.is_dir():
        pytest.skip(f"{path} not present (the shared data folder sits beside the repository)")
    return path
