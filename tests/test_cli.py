from __future__ import annotations

import json
import logging

import pytest

from routerretriever.cli import main
from routerretriever.errors import RouterRetrieverError
from tests.conftest import TINY, tiny_model_path


def test_evaluate_prints_table_and_writes_json(tiny, tmp_path, capsys):
    out = tmp_path / "scores.json"
    args = ["evaluate", str(tiny), "--cache-dir", str(tmp_path / "c"), "--json", str(out)]
    assert main([*args, "--model", str(tiny_model_path())]) == 0
    printed = capsys.readouterr().out
    assert "| dataset" in printed and "ndcg@10" in printed and "tiny" in printed
    report = json.loads(out.read_text())["tiny"]
    assert 0.0 < report["scores"]["ndcg@10"] <= 1.0
    assert report["queries"] == 10 and len(report["per_query"]) == 10
    # which runtime embedded the corpus, and where: what the numbers came from
    assert report["corpus_runtime"] in ("torch", "onnx", "bfloat16") and report["device"]


def test_evaluate_on_each_corpus_runtime_writes_its_own_cache_file(tiny, tmp_path, capsys):
    cache = tmp_path / "c"
    scores = {}
    for backend in ("torch", "bfloat16"):
        out = tmp_path / f"{backend}.json"
        args = ["evaluate", str(tiny), "--cache-dir", str(cache), "--json", str(out)]
        assert main([*args, "--model", str(tiny_model_path()), "--backend", backend]) == 0
        report = json.loads(out.read_text())["tiny"]
        assert report["corpus_runtime"] == backend
        scores[backend] = report["scores"]["ndcg@10"]
    files = [p.name for p in (cache / "corpus").iterdir()]
    assert len(files) == 2 and sum(f.endswith("-bfloat16.npz") for f in files) == 1
    assert scores["bfloat16"] == pytest.approx(scores["torch"], abs=0.05)
    with pytest.raises(SystemExit):
        main(["evaluate", str(tiny), "--backend", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


def test_user_mistakes_are_one_line_errors(tiny, tmp_path, capsys):
    assert main(["evaluate", str(tiny), "--split", "dev"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unknown split 'dev'" in err and "Traceback" not in err
    (tiny / "queries.jsonl").write_text("{oops\n")
    assert main(["evaluate", str(tiny), "--cache-dir", str(tmp_path)]) == 2
    assert "queries.jsonl:1: not valid JSON" in capsys.readouterr().err
    assert main(["evaluate", str(tiny), "--metrics", "ndcg@x"]) == 2
    assert "unknown metric" in capsys.readouterr().err


def test_train_expert_list_and_evaluate_with_it(tiny, tmp_path, capsys, caplog):
    logging.getLogger("routerretriever").setLevel(logging.WARNING)  # as at a fresh start
    store = tmp_path / "store"
    args = [
        "train-expert",
        "tiny",
        "--dataset",
        str(tiny),
        "--from-corpus",
        "--out",
        str(store),
        "--cache-dir",
        str(tmp_path / "c"),
        "--max-steps",
        "4",
        "--eval-every",
        "2",
        "--batch-size",
        "8",
        "--model",
        str(tiny_model_path()),
        "--backend",
        "torch",
    ]
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(args) == 0
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], caught
    assert "expert tiny ->" in capsys.readouterr().out
    # Without -v and without a terminal, training still says how it goes (no silent minutes).
    assert "tiny step 2 loss" in caplog.text and "tiny step 4 loss" in caplog.text
    assert (store / "tiny" / "adapter_model.safetensors").is_file()
    assert main(["experts", "list", str(store)]) == 0
    assert "| tiny " in capsys.readouterr().out
    assert main(["experts", "show", str(store), "tiny"]) == 0
    assert "corpus by torch" in capsys.readouterr().out  # mined over the runtime asked for
    out = tmp_path / "e.json"
    assert (
        main(
            [
                "evaluate",
                str(tiny),
                "--expert",
                str(store / "tiny"),
                "--cache-dir",
                str(tmp_path / "c"),
                "--json",
                str(out),
                "--model",
                str(tiny_model_path()),
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["tiny"]["expert"] == "tiny"
    assert main(["train-expert", "bad/name", "--dataset", str(tiny)]) == 2
    assert "invalid expert name" in capsys.readouterr().err
    assert main(["train-expert", "x", "--dataset", str(tiny), "--split", "test"]) == 2
    assert "test split is for evaluation only" in capsys.readouterr().err


def test_serve_refuses_a_bad_setup_before_listening(tiny, tmp_path, capsys):
    assert main(["serve", "--store", str(tmp_path / "nope"), "--corpus", str(tiny)]) == 2
    assert "expert store" in capsys.readouterr().err
    (tmp_path / "store").mkdir()
    args = ["serve", "--store", str(tmp_path / "store"), "--corpus", str(tiny), "--domain", "x"]
    assert main(args) == 2
    assert "domain 'x': expected NAME=DIR or NAME=DIR:SPLIT" in capsys.readouterr().err
    args = ["serve", "--store", str(tmp_path / "store"), "--corpus", str(tiny)]
    assert main([*args, "--decline", "../x"]) == 2
    assert "--decline: invalid expert name '../x'" in capsys.readouterr().err
    assert main([*args, "--model-workers", "0"]) == 2
    assert "--model-workers must be at least 1, got 0" in capsys.readouterr().err
    assert main([*args, "--model-workers", "2", "--replicas", "2"]) == 2
    assert "--model-workers goes with a single server" in capsys.readouterr().err
    import socket

    with socket.socket() as busy:  # a port someone else listens on: said before any loading
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        args = ["serve", "--store", str(tmp_path / "store"), "--corpus", str(tiny), "--port", port]
        assert main(args) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "another --port" in err


def test_serve_embeds_documents_with_the_backend_asked_for(tiny, tmp_path):
    from routerretriever.cli import build_parser
    from routerretriever.serve_cli import open_engine

    (tmp_path / "store").mkdir()
    args = ["serve", "--store", str(tmp_path / "store"), "--corpus", str(tiny)]
    args += ["--model", str(tiny_model_path()), "--cache-dir", str(tmp_path / "c")]
    engine = open_engine(build_parser().parse_args([*args, "--backend", "bfloat16"]))
    assert engine.runtime == "bfloat16"
    files = [p.name for p in (tmp_path / "c" / "corpus").iterdir()]
    assert len(files) == 1 and files[0].endswith("-bfloat16.npz")
    assert open_engine(build_parser().parse_args(args)).runtime == "auto"


def test_serve_takes_a_saved_routers_settings_or_its_own_flags_not_both(tmp_path):
    from routerretriever.cli import build_parser
    from routerretriever.errors import ModelError
    from routerretriever.serve_cli import SERVE_DEFAULTS, resolve_settings

    router = tmp_path / "rr"
    router.mkdir()
    policy = {"kind": "pilots", "rule": "mean", "base_mix": 0.0, "decline": ["nfcorpus"]}
    manifest = {"policy": policy, "alpha": 0.6, "normalise": "max", "bm25": {"k1": 1.2}}
    (router / "router.json").write_text(json.dumps(manifest))
    base = ["serve", "--store", str(tmp_path), "--corpus", str(tmp_path)]

    def resolved(*extra):
        args = build_parser().parse_args([*base, *extra])
        resolve_settings(args)
        return args

    args = resolved("--router", str(router))
    assert (args.alpha, args.normalise, args.rule, args.base_mix) == (0.6, "max", "mean", 0.0)
    assert args.decline == ["nfcorpus"] and args.bm25.k1 == 1.2
    plain = resolved()  # no router: the defaults, and BM25's
    assert {k: getattr(plain, k) for k in SERVE_DEFAULTS} == SERVE_DEFAULTS
    assert resolved("--alpha", "0.9", "--decline", "x").alpha == 0.9
    with pytest.raises(RouterRetrieverError, match="--router sets --alpha, --decline"):
        resolved("--router", str(router), "--alpha", "0.9", "--decline", "x")
    assert args.base_alpha is None and args.scope is None and plain.scope is None
    # A router gated per corpus brings its scope and its base queries' dense weight.
    scope = {"corpora": {"c": {"size": 1, "hashes": ["00000000000000ff"]}}, "experts": {"a": ["c"]}}
    scoped = {**manifest, "base_alpha": 0.5, "policy": {**policy, "scope": scope}}
    (router / "router.json").write_text(json.dumps(scoped))
    args = resolved("--router", str(router))
    assert args.base_alpha == 0.5 and args.scope.experts == {"a": ("c",)}
    bad = {**scoped, "policy": {**policy, "scope": {**scope, "experts": {"a": ["nowhere"]}}}}
    (router / "router.json").write_text(json.dumps(bad))
    with pytest.raises(ModelError, match="cannot read the saved router"):
        resolved("--router", str(router))
    (router / "router.json").write_text(json.dumps({**manifest, "policy": {"kind": "neighbours"}}))
    with pytest.raises(ModelError, match="only a pilots router's settings can be served"):
        resolved("--router", str(router))
    (router / "router.json").write_text(json.dumps({**manifest, "normalise": "rank"}))
    with pytest.raises(ModelError, match="cannot read the saved router"):
        resolved("--router", str(router))
    with pytest.raises(ModelError, match="no router.json"):
        resolved("--router", str(tmp_path / "nope"))


def test_evaluate_a_saved_router_on_any_beir_folder(trained, tiny, tmp_path, capsys):
    """The experiment's saved default travels: `evaluate DIR --router FOLDER` scores it as the
    Python API does, with the BM25 index built for that corpus."""
    import numpy as np

    from routerretriever import Encoder, evaluate_retriever, load_beir
    from routerretriever.encoder import BASE
    from routerretriever.experts import load_expert
    from routerretriever.pilots import DomainInstances, build_pilots
    from routerretriever.retriever import RouterRetriever

    _, store, _ = trained
    enc = Encoder.load(tiny_model_path())
    for name in ("alpha", "beta"):
        load_expert(enc, store / name)
    texts = ["statins", "wings", "libraries"]
    inst = DomainInstances(
        "d", ["a", "b", "c"], enc.encode(texts), {e: np.array([1.0, 0.5, 0.2]) for e in ("alpha",)}
    )
    inst.scores["beta"] = np.array([0.1, 0.9, 0.3])
    rr = RouterRetriever(enc, build_pilots([inst], ["alpha", "beta"]), alpha=0.6)
    rr.save(tmp_path / "router")
    out = tmp_path / "scores.json"
    args = ["evaluate", str(tiny), "--router", str(tmp_path / "router"), "--json", str(out)]
    assert main([*args, "--cache-dir", str(tmp_path / "c")]) == 0
    report = json.loads(out.read_text())["tiny"]
    want = evaluate_retriever(RouterRetriever.load(tmp_path / "router"), load_beir(tiny))
    assert report["scores"]["ndcg@10"] == want.scores["ndcg@10"]
    assert report["router"] == str(tmp_path / "router")
    assert list((tmp_path / "c" / "bm25").iterdir())  # BM25 index built and cached
    assert main([*args, "--expert", str(store / "alpha")]) == 2
    assert "--router brings its own" in capsys.readouterr().err
    assert BASE not in json.loads((tmp_path / "router" / "router.json").read_text())["experts"]


def test_cli_mistakes_are_one_line_errors_not_tracebacks(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["experts", "list", str(tmp_path / "empty")]) == 0
    assert "no experts in" in capsys.readouterr().out
    assert main(["experiment", str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no such config file" in err
    (tmp_path / "bad.toml").write_text("x = [\n")
    assert main(["experiment", str(tmp_path / "bad.toml")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'bad.toml'}: not valid TOML" in err and "Traceback" not in err
    (tmp_path / "notbeir").mkdir()
    (tmp_path / "notbeir" / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n')
    assert main(["evaluate", str(tmp_path / "notbeir")]) == 2
    err = capsys.readouterr().err
    assert (
        "not a BEIR folder: no queries.jsonl, no qrels/test.tsv" in err and "Traceback" not in err
    )
    (tmp_path / "nodata.toml").write_text(
        'data_root = "nowhere"\nstore = "st"\nresults = "rs"\n'
        '[[domains]]\nname = "scifact"\npath = "beir/scifact"\ntrain = "train"\n'
    )
    assert main(["experiment", str(tmp_path / "nodata.toml")]) == 2
    err = capsys.readouterr().err
    assert "missing data:" in err and "scifact: no folder" in err and "data get NAME" in err
    assert not (tmp_path / "st").exists()  # checked before anything was made


def test_version_and_a_fast_help():
    import subprocess
    import sys

    from routerretriever import __version__

    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, routerretriever.cli as c; c.build_parser(); print('torch' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "False"  # building the parser (for --help) loads no model library
    version = subprocess.run(
        [sys.executable, "-m", "routerretriever.cli", "--version"], capture_output=True, text=True
    ).stdout
    assert version.strip() == f"routerretriever {__version__}"


def test_help_shows_no_raw_markup(capsys):
    import re

    from routerretriever.cli import build_parser

    parser = build_parser()
    sub = next(
        a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction)
    )
    texts = [parser.format_help()]
    texts += [p.format_help() for p in sub.choices.values()]
    for p in sub.choices.values():  # nested commands (experts list ...)
        for a in p._actions:
            if hasattr(a, "choices") and isinstance(a.choices, dict):
                texts += [q.format_help() for q in a.choices.values()]
    for text in texts:
        assert not re.search(r"``|:(class|func|meth):", text), text[:200]


def test_experts_show_remove_and_caveats(trained, tmp_path, capsys):
    import json
    import shutil

    _, store_src, _ = trained
    store = tmp_path / "store"
    shutil.copytree(store_src, store)
    meta = store / "beta" / "expert.json"
    info = json.loads(meta.read_text())
    info["training"]["best_step"] = 0  # as if early stopping kept the start: the base model
    meta.write_text(json.dumps(info))

    assert main(["experts", "list", str(store)]) == 0
    out = capsys.readouterr().out
    assert str(store) not in out and "= base" in out  # no absolute paths; the step-0 expert named
    assert all(len(line) <= 140 for line in out.splitlines())

    assert main(["experts", "show", str(store), "beta"]) == 0
    shown = capsys.readouterr()
    assert "best step 0 of" in shown.out and "IS the base model" in shown.err
    assert main(["experts", "show", str(store), "gamma"]) == 2
    assert "no expert 'gamma'" in capsys.readouterr().err

    model = ["--model", str(tiny_model_path())]
    assert main(["evaluate", str(TINY), "--expert", str(store / "beta"), *model]) == 0
    assert "warning: expert beta kept step 0" in capsys.readouterr().err

    assert main(["experts", "remove", str(store), "beta"]) == 2
    assert "add --yes" in capsys.readouterr().err and (store / "beta").is_dir()
    (store / ".served.json").write_text(json.dumps({"experts": {"alpha": "alpha"}}))
    assert main(["experts", "remove", str(store), "alpha", "--yes"]) == 2
    assert "in the served set" in capsys.readouterr().err and (store / "alpha").is_dir()
    assert main(["experts", "remove", str(store), "beta", "--yes"]) == 0
    assert not (store / "beta").exists() and [p.name for p in store.iterdir()] != []
    assert not [p for p in store.iterdir() if p.name.startswith(".beta")]


def test_caveat_names_an_expert_below_the_base():
    from routerretriever.experts import ExpertInfo, caveat

    info = ExpertInfo(
        "x", "m", "f", training={"best_step": 5}, dev={"ndcg@10": 0.3, "base_ndcg@10": 0.4}
    )
    assert "below the base model" in caveat(info)
    info = ExpertInfo(
        "x", "m", "f", training={"best_step": 5}, dev={"ndcg@10": 0.5, "base_ndcg@10": 0.4}
    )
    assert caveat(info) is None


def test_router_build_bundles_a_routed_model_that_evaluate_reads(trained, tmp_path, capsys):
    from routerretriever import evaluate_retriever, load_beir
    from routerretriever.retriever import RouterRetriever

    _, store, _ = trained
    model = ["--model", str(tiny_model_path()), "--cache-dir", str(tmp_path / "c")]
    args = ["router", "build", "--expert", str(store / "alpha"), "--expert", str(store / "beta")]
    args += [
        "--domain",
        f"tiny={TINY}:corpus",
        "--out",
        str(tmp_path / "rr"),
        "--normalise",
        "zscore",
    ]
    args += ["--alpha", "0.7", "--backend", "torch"]
    assert main([*args, *model]) == 0
    cached = [f.name for f in (tmp_path / "c").rglob("*.npz")]
    assert cached and not [n for n in cached if n.endswith(("-onnx.npz", "-bfloat16.npz"))]
    assert f"routed model -> {tmp_path / 'rr'}" in capsys.readouterr().out
    back = RouterRetriever.load(tmp_path / "rr")
    assert back.alpha == 0.7 and back.encoder.experts == ["alpha", "beta"]
    assert back.normalise == "zscore"
    from routerretriever.cli import build_parser
    from routerretriever.serve_cli import resolve_settings

    served = build_parser().parse_args(
        ["serve", "--store", str(store), "--corpus", str(TINY), "--router", str(tmp_path / "rr")]
    )
    resolve_settings(served)  # what `serve --router` serves: the saved system's settings
    assert (served.alpha, served.normalise, served.rule) == (0.7, "zscore", "weighted")
    assert served.base_mix == 0.0 and served.decline == [] and served.bm25 == back.bm25
    out = tmp_path / "s.json"
    ev = ["evaluate", str(TINY), "--router", str(tmp_path / "rr"), "--json", str(out)]
    assert main([*ev, "--cache-dir", str(tmp_path / "c")]) == 0
    want = evaluate_retriever(back, load_beir(TINY)).scores["ndcg@10"]
    assert json.loads(out.read_text())["tiny"]["scores"]["ndcg@10"] == want
    with pytest.raises(SystemExit) as exit_:  # argparse refuses it, before any loading
        main([*args[:-2], "--alpha", "2", *model])
    assert exit_.value.code == 2 and "--alpha must be in [0, 1]" in capsys.readouterr().err
