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
