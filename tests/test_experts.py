from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routerretriever import Encoder, ModelError
from routerretriever.experts import check_folder, list_experts, load_expert
from routerretriever.losses import contrastive_loss
from tests.conftest import PROBES, tiny_model_path


def test_training_lowers_loss_and_changes_only_lora_weights(trained):
    enc, store, out = trained
    model, info, _ = out["alpha"]
    assert info.training["last_loss"] < info.training["first_loss"]
    assert info.training["device"] == str(enc.device)  # where it trained, in expert.json
    changed = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and all("lora_" in n for n in changed)
    from safetensors import safe_open

    with safe_open(str(store / "alpha" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert keys and all("lora_" in k for k in keys)
        assert any(f.get_tensor(k).abs().sum() > 0 for k in keys if "lora_B" in k)  # trained
    meta = json.loads((store / "alpha" / "expert.json").read_text())
    assert meta["lora"]["r"] == 8 and meta["lora"]["alpha"] == 32 and meta["seconds"] > 0


def test_save_then_load_gives_identical_embeddings(trained):
    _, store, out = trained
    enc = Encoder.load(tiny_model_path())
    load_expert(enc, store / "alpha")
    np.testing.assert_allclose(enc.encode(PROBES, experts="alpha"), out["alpha"][2], atol=1e-6)


def test_switching_experts_on_one_base_model(trained):
    _, store, out = trained
    enc = Encoder.load(tiny_model_path())
    base = enc.encode(PROBES)
    for name in ("alpha", "beta"):
        load_expert(enc, store / name)
    a, b = enc.encode(PROBES, experts="alpha"), enc.encode(PROBES, experts="beta")
    assert not np.allclose(a, b, atol=1e-4) and not np.allclose(a, base, atol=1e-4)
    np.testing.assert_allclose(a, out["alpha"][2], atol=1e-6)
    np.testing.assert_allclose(b, out["beta"][2], atol=1e-6)
    np.testing.assert_allclose(enc.encode(PROBES), base, atol=1e-6)  # base unaffected
    calls = []
    original = enc._forward_mixed
    enc._forward_mixed = lambda batch, names: calls.append(list(names)) or original(batch, names)
    mixed = enc.encode(PROBES, experts=["beta", None, "alpha"])  # batches mixing experts
    assert calls and all(len(set(c)) > 1 for c in calls)  # the mixed pass really ran
    np.testing.assert_allclose(mixed[0], b[0], atol=1e-5)
    np.testing.assert_allclose(mixed[1], base[1], atol=1e-5)
    np.testing.assert_allclose(mixed[2], a[2], atol=1e-5)
    # Threads mixing experts differently at once each get their own rows' experts.
    plans = [["alpha", "beta", None], [None, "alpha", "beta"], ["beta", "beta", "alpha"]] * 4
    want = {"alpha": a, "beta": b, None: base}
    results: list = [None] * len(plans)

    def run(k: int) -> None:
        results[k] = enc.encode(PROBES, experts=plans[k])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(plans))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for plan, got in zip(plans, results, strict=True):
        np.testing.assert_allclose(got, [want[e][i] for i, e in enumerate(plan)], atol=1e-5)
    enc.remove_adapter("alpha")
    mixed = enc.encode(PROBES, experts=["beta", None, "beta"])  # rebuilt without alpha
    np.testing.assert_allclose(mixed[[0, 2]], b[[0, 2]], atol=1e-5)
    np.testing.assert_allclose(mixed[1], base[1], atol=1e-5)
    with pytest.raises(ValueError, match=r"unknown expert\(s\) \['alpha'\]; loaded: \['beta'\]"):
        enc.encode(PROBES, experts="alpha")
    enc.remove_adapter("beta")
    np.testing.assert_allclose(enc.encode(PROBES), base, atol=1e-6)


def test_adapter_loads_with_plain_peft(trained):
    from peft import PeftModel
    from transformers import AutoModel

    enc, store, out = trained
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(enc.model_path), store / "beta")
    model.to(enc.device)
    np.testing.assert_allclose(enc.encode(PROBES, model=model), out["beta"][2], atol=1e-6)


def test_mismatched_base_model_refused(trained, tmp_path):
    _, store, _ = trained
    meta = json.loads((store / "alpha" / "expert.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    for f in (store / "alpha").iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    meta["base_fingerprint"] = "0123456789abcdef"
    (other / "expert.json").write_text(json.dumps(meta))
    with pytest.raises(
        ModelError, match=r"was trained on base model .* \(fingerprint 0123456789abcdef\)"
    ):
        load_expert(Encoder.load(), other)


def test_pickled_adapter_refused(trained, tmp_path):
    _, store, _ = trained
    bad = tmp_path / "pickled"
    bad.mkdir()
    for name in ("expert.json", "adapter_config.json"):
        (bad / name).write_bytes((store / "alpha" / name).read_bytes())
    torch.save({"x": torch.zeros(1)}, bad / "adapter_model.bin")
    with pytest.raises(
        ModelError, match=r"no adapter_model\.safetensors .*pickle formats are refused"
    ):
        check_folder(bad)
    (bad / "adapter_model.safetensors").write_bytes(
        (store / "alpha" / "adapter_model.safetensors").read_bytes()
    )
    with pytest.raises(ModelError, match="contains pickle files"):
        check_folder(bad)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=6,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_expert_metadata_loads_or_names_its_folder(trained, tiny_encoder, data):
    """An expert folder is a user's (``experts add``, a saved router): whatever its two JSON
    files hold, loading gives an expert or a ModelError naming the folder."""
    import shutil
    import tempfile
    from pathlib import Path

    _, store, _ = trained
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "x"
        shutil.copytree(store / "alpha", folder)
        name = data.draw(st.sampled_from(["expert.json", "adapter_config.json"]))
        raw = json.loads((folder / name).read_text())
        key = data.draw(st.sampled_from([*raw, "extra"]))
        edit = data.draw(st.sampled_from(["replace", "delete", "whole file"]))
        if edit == "whole file":
            raw = data.draw(json_values)
        elif edit == "delete":
            raw.pop(key, None)
        else:
            raw[key] = data.draw(json_values)
        (folder / name).write_text(json.dumps(raw))
        try:
            load_expert(tiny_encoder, folder, "fuzzed")
        except ModelError as e:
            assert str(folder) in str(e) and len(str(e)) < 1000
        finally:
            if "fuzzed" in tiny_encoder.experts:
                tiny_encoder.remove_adapter("fuzzed")


def test_adapter_weights_that_do_not_fit_are_named(trained, tiny_encoder, tmp_path):
    from safetensors.torch import load_file, save_file

    _, store, _ = trained
    folder = tmp_path / "x"
    folder.mkdir()
    for f in (store / "alpha").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(folder / "adapter_model.safetensors"))
    key = next(k for k in weights if ".lora_A." in k)
    for bad in (weights[key][:, :-1], weights[key].clone().fill_(float("nan"))):
        save_file({**weights, key: bad.contiguous()}, str(folder / "adapter_model.safetensors"))
        with pytest.raises(ModelError, match="does not fit the layer .*or holds NaN"):
            load_expert(tiny_encoder, folder, "misfit")
    (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ModelError, match="cannot read adapter_model.safetensors"):
        load_expert(tiny_encoder, folder, "misfit")
    assert "misfit" not in tiny_encoder.experts


def test_list_experts(trained):
    _, store, _ = trained
    assert [e.name for e in list_experts(store)] == ["alpha", "beta"]


def test_contrastive_loss_masks_false_negatives():
    q = torch.nn.functional.normalize(torch.randn(2, 4), dim=-1)
    cand = torch.cat([q, q[:1]])  # row 2 duplicates query 0's positive
    targets = torch.tensor([0, 1])
    mask = torch.tensor([[False, False, True], [False, False, False]])
    masked = contrastive_loss(q, cand, targets, mask, temperature=0.05)
    unmasked = contrastive_loss(q, cand, targets, None, temperature=0.05)
    assert masked < unmasked
    scores = q @ cand.T / 0.05
    ce = torch.nn.functional.cross_entropy
    expected = (ce(scores[0, :2], targets[0]) + ce(scores[1], targets[1])) / 2
    assert torch.allclose(masked, expected, atol=1e-5)


def test_killed_expert_write_leaves_old_expert_intact(trained, tmp_path):
    from routerretriever.experts import ExpertInfo, write_expert_folder

    _, store, _ = trained
    target = tmp_path / "alpha"
    target.mkdir()
    (target / "expert.json").write_text('{"name": "alpha"}')

    def write(tmp):
        (tmp / "adapter_model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_expert_folder(target, write, ExpertInfo("alpha", "m", "f"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alpha"]
    assert (target / "expert.json").read_text() == '{"name": "alpha"}'


def test_training_is_seeded_without_touching_the_callers_random_state(encoder, tmp_path):
    import random

    import torch

    from routerretriever.config import TrainConfig
    from routerretriever.training import fit_expert, load_training_set
    from tests.conftest import TINY

    ts = load_training_set(encoder, TINY, from_corpus=True, cache_dir=tmp_path)
    cfg = TrainConfig(max_steps=2, eval_every=1, batch_size=4, seed=7)
    torch.manual_seed(123)
    random.seed(123)
    before = torch.get_rng_state(), random.getstate()
    first = fit_expert(encoder, [ts], "x", train=cfg, show_progress=False)[1]
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    torch.manual_seed(999)  # another caller state: the same seed still trains the same expert
    again = fit_expert(encoder, [ts], "x", train=cfg, show_progress=False)[1]
    assert first.dev["history"][1:] == again.dev["history"][1:]  # losses and dev scores


def test_training_mines_over_the_corpus_runtime_asked_for(tmp_path):
    """An experiment pinned to the float32 reference trains on it too: before, training took
    "auto" (bfloat16 on such CPUs), so the experts differed from the tables' runtime."""
    from routerretriever import Encoder
    from routerretriever.config import TrainConfig
    from routerretriever.training import fit_expert, load_training_set
    from tests.conftest import TINY

    encoder = Encoder.load(device="cpu")  # ONNX Runtime runs on the CPU (an error on a GPU)
    for backend in ("torch", "onnx"):
        ts = load_training_set(encoder, TINY, from_corpus=True, cache_dir=tmp_path, backend=backend)
        assert ts.doc_backend == backend
    cfg = TrainConfig(max_steps=1, eval_every=1, batch_size=4)
    info = fit_expert(encoder, [ts], "x", train=cfg, show_progress=False)[1]
    assert info.training["corpus_runtime"] == "onnx"


def test_a_dev_split_beyond_max_dev_is_kept_aside_unseen(encoder, tmp_path):
    """Queries of a dev split past ``max_dev`` are neither trained nor early-stopped on: the
    experiment scores its choices there, where its own stopping set would flatter the expert."""
    import shutil

    from routerretriever.training import load_training_set
    from tests.conftest import TINY

    folder = tmp_path / "beir"
    shutil.copytree(TINY, folder)
    rows = (TINY / "qrels" / "test.tsv").read_text().splitlines()
    header, judged = rows[0], rows[1:]
    (folder / "qrels" / "train.tsv").write_text("\n".join([header, *judged[:4]]) + "\n")
    (folder / "qrels" / "dev.tsv").write_text("\n".join([header, *judged[4:]]) + "\n")
    dev_ids = {r.split("\t")[0] for r in judged[4:]}
    cache = tmp_path / "c"
    ts = load_training_set(encoder, folder, max_dev=3, cache_dir=cache)
    assert len(ts.dev_qrels) == 3 and set(ts.unseen_qrels) == dev_ids - set(ts.dev_qrels)
    assert set(ts.unseen_queries) == set(ts.unseen_qrels) and ts.unseen_qrels
    assert not set(ts.unseen_qrels) & (set(ts.qrels) | set(ts.dev_qrels))
    again = load_training_set(encoder, folder, max_dev=3, cache_dir=cache)
    assert again.dev_qrels == ts.dev_qrels and again.unseen_qrels == ts.unseen_qrels  # seeded
    whole = load_training_set(encoder, folder, max_dev=100, cache_dir=cache)
    assert set(whole.dev_qrels) == dev_ids and not whole.unseen_qrels
    # Held-out training queries (no dev split) leave nothing unseen.
    assert not load_training_set(encoder, TINY, from_corpus=True, cache_dir=cache).unseen_qrels


@settings(max_examples=6, deadline=None)
@given(hold_out=st.integers(0, 4), max_dev=st.integers(1, 4))
def test_held_out_training_queries_are_neither_trained_nor_stopped_on(
    encoder, tmp_path_factory, hold_out, max_dev
):
    """``hold_out`` labelled training queries join the unseen set: a third split for choices
    made after training; the rest trains, seeded, and nothing is in two splits."""
    import shutil

    from routerretriever.training import load_training_set
    from tests.conftest import TINY

    folder = tmp_path_factory.mktemp("beir")
    shutil.rmtree(folder)
    shutil.copytree(TINY, folder)
    rows = (TINY / "qrels" / "test.tsv").read_text().splitlines()
    (folder / "qrels" / "train.tsv").write_text("\n".join(rows) + "\n")  # no dev split
    judged = {r.split("\t")[0] for r in rows[1:]}
    cache = tmp_path_factory.mktemp("c")
    plain = load_training_set(encoder, folder, max_dev=max_dev, cache_dir=cache)
    ts = load_training_set(encoder, folder, max_dev=max_dev, cache_dir=cache, hold_out=hold_out)
    assert ts.dev_qrels == plain.dev_qrels  # the dev (stopping) set does not move
    assert len(ts.unseen_qrels) == hold_out and set(ts.unseen_queries) == set(ts.unseen_qrels)
    assert set(ts.qrels) == set(plain.qrels) - set(ts.unseen_qrels)
    splits = (set(ts.qrels), set(ts.dev_qrels), set(ts.unseen_qrels))
    assert sum(map(len, splits)) == len(set().union(*splits)) == len(judged)
    assert set(ts.positives) <= set(ts.qrels)  # training sees only its own queries
    again = load_training_set(encoder, folder, max_dev=max_dev, cache_dir=cache, hold_out=hold_out)
    assert again.unseen_qrels == ts.unseen_qrels and again.qrels == ts.qrels  # seeded
    with pytest.raises(ValueError, match="leaves no training query"):
        load_training_set(encoder, folder, max_dev=max_dev, cache_dir=cache, hold_out=len(judged))
    with pytest.raises(ValueError, match="needs labelled queries"):
        load_training_set(encoder, TINY, from_corpus=True, cache_dir=cache, hold_out=1)
    with pytest.raises(ValueError, match="hold_out must be >= 0, got -1"):
        load_training_set(encoder, folder, cache_dir=cache, hold_out=-1)
