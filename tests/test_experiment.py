from __future__ import annotations

import pytest

from routerretriever.experiment import ExperimentConfig


def write(tmp_path, text):
    path = tmp_path / "x.toml"
    path.write_text(text)
    return path


def test_paths_resolve_relative_to_the_config(tmp_path):
    cfg = ExperimentConfig.load(
        write(
            tmp_path,
            """
data_root = "data"
store = "out/experts"
[train]
lr = 3e-3
[[domains]]
name = "a"
path = "a"
train = "train"
overrides = {mine_skip = 10}
[[domains]]
name = "b"
path = "b"
train = "none"
""",
        )
    )
    assert cfg.domains[0].path == (tmp_path / "data" / "a").resolve()
    assert cfg.store == (tmp_path / "out" / "experts").resolve()
    assert cfg.train.lr == 3e-3 and cfg.domains[0].overrides == {"mine_skip": 10}
    assert [d.name for d in cfg.expert_domains] == ["a"]


def test_unknown_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown \[train\] keys \['learning_rate'\]"):
        ExperimentConfig.load(
            write(tmp_path, '[train]\nlearning_rate = 1\n[[domains]]\nname="a"\npath="a"')
        )
    with pytest.raises(ValueError, match="no \\[\\[domains\\]\\]"):
        ExperimentConfig.load(write(tmp_path, "store = 'x'"))
    with pytest.raises(ValueError, match="domain 'a': unknown overrides \\['foo'\\]"):
        ExperimentConfig.load(write(tmp_path, '[[domains]]\nname="a"\npath="a"\noverrides={foo=1}'))
    with pytest.raises(
        ValueError, match="backend must be one of auto, torch, onnx, bfloat16; got 'gpu'"
    ):
        ExperimentConfig.load(write(tmp_path, 'backend = "gpu"\n[[domains]]\nname="a"\npath="a"'))
    for backend in ("torch", "bfloat16"):
        cfg = ExperimentConfig.load(
            write(tmp_path, f'backend = "{backend}"\n[[domains]]\nname="a"\npath="a"')
        )
        assert cfg.backend == backend
    assert cfg.normalisations == ["minmax"]  # the fusion the pool's candidates try by default
    dom = '\n[[domains]]\nname="a"\npath="a"'
    for bad in ('"max"', "[]", '["max", "rank"]'):
        with pytest.raises(ValueError, match=r"x\.toml: normalisations must be a non-empty list"):
            ExperimentConfig.load(write(tmp_path, f"normalisations = {bad}{dom}"))
    cfg = ExperimentConfig.load(write(tmp_path, f'normalisations = ["max", "minmax", "max"]{dom}'))
    assert cfg.normalisations == ["max", "minmax"]
    assert cfg.domains[0].hold_out == 0  # no third split unless asked
    labelled = '[[domains]]\nname="a"\npath="a"\ntrain="train"\nhold_out = 100'
    assert ExperimentConfig.load(write(tmp_path, labelled)).domains[0].hold_out == 100
    for bad, why in (("-1", "an integer >= 0"), ('"10"', "an integer >= 0")):
        with pytest.raises(ValueError, match=f"domain 'a': hold_out must be {why}"):
            ExperimentConfig.load(write(tmp_path, labelled.replace("100", bad)))
    with pytest.raises(ValueError, match="domain 'a': hold_out needs labelled training queries"):
        ExperimentConfig.load(write(tmp_path, f"{dom}\nhold_out = 5"))


@pytest.mark.slow
def test_every_train_setting_in_the_toml_reaches_the_expert(tmp_path):
    """The experiment trains through the library: settings the CLI has no flag for (here
    temperature, warmup_ratio, mine_depth, max_query_length) reach expert.json."""
    import json

    from routerretriever.experiment import ExperimentConfig, train_all
    from tests.conftest import TINY

    config = tmp_path / "tiny.toml"
    config.write_text(
        f"""
store = "store"
results = "results"
cache_dir = "cache"
[train]
lr = 1e-3
batch_size = 8
max_steps = 4
eval_every = 2
patience = 1
temperature = 0.07
warmup_ratio = 0.2
mine_depth = 7
max_query_length = 24
[pseudo]
crops_per_doc = 1
[[domains]]
name = "tiny"
path = "{TINY}"
train = "corpus"
"""
    )
    cfg = ExperimentConfig.load(config)
    cfg.expert_domains[0].overrides["mine_depth"] = 9  # a domain's override wins
    train_all(cfg)
    tiny = json.loads((tmp_path / "store" / "tiny" / "expert.json").read_text())["training"]
    assert (tiny["temperature"], tiny["warmup_ratio"], tiny["mine_depth"]) == (0.07, 0.2, 9)
    assert tiny["max_query_length"] == 24
    multi = json.loads((tmp_path / "store" / "multitask" / "expert.json").read_text())["training"]
    assert multi["temperature"] == 0.07 and multi["max_steps"] == 4  # one domain: 1 x budget
    # multitask = false: the baseline is neither trained nor expected (the demo's setting).
    import shutil

    shutil.rmtree(tmp_path / "store" / "multitask")
    config.write_text(
        config.read_text().replace('results = "results"', 'results = "results"\nmultitask = false')
    )
    cfg = ExperimentConfig.load(config)
    assert not cfg.multitask
    train_all(cfg)  # the domain's expert is kept; nothing else is trained
    assert not (tmp_path / "store" / "multitask").exists()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("[pseudo]\nmax_doc = 5", r"x\.toml: unknown \[pseudo\] keys \['max_doc'\]; known: "),
        ("[bm25]\nfeedback_doc = 5", r"x\.toml: unknown \[bm25\] keys \['feedback_doc'\]"),
        ("[bm25]\nfeedback_weight = 3", r"x\.toml: \[bm25\]: bm25 feedback_weight must be"),
        ("[bm25]\nk1 = -1", r"x\.toml: \[bm25\]: bm25 k1 must be"),
        ("bm25 = 3", r"x\.toml: \[bm25\] must be a table"),
    ],
)
def test_a_bad_settings_table_names_the_file_and_table(tmp_path, table, message):
    with pytest.raises(ValueError, match=message):
        ExperimentConfig.load(write(tmp_path, f'{table}\n[[domains]]\nname="a"\npath="a"'))


def test_bm25_feedback_is_read_from_the_config(tmp_path):
    text = '[bm25]\nfeedback_docs = 5\nfeedback_terms = 5\n[[domains]]\nname="a"\npath="a"'
    cfg = ExperimentConfig.load(write(tmp_path, text))
    assert cfg.bm25.feedback and cfg.bm25.feedback_docs == 5 and cfg.bm25.feedback_weight == 0.1
    assert not ExperimentConfig.load(
        write(tmp_path, '[[domains]]\nname="a"\npath="a"')
    ).bm25.feedback
