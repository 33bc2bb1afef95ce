from __future__ import annotations

import json
import tempfile
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routerretriever.config import TrainConfig
from routerretriever.experiment import ExperimentConfig
from routerretriever.experiment_config import DOMAIN_KEYS, RAW_KEYS
from routerretriever.lexical import BM25Config
from routerretriever.pseudo import PseudoQueryConfig


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
    with pytest.raises(ValueError, match=r"\[train\]: unknown keys \['learning_rate'\]"):
        ExperimentConfig.load(
            write(tmp_path, '[train]\nlearning_rate = 1\n[[domains]]\nname="a"\npath="a"')
        )
    with pytest.raises(ValueError, match="no \\[\\[domains\\]\\]"):
        ExperimentConfig.load(write(tmp_path, "store = 'x'"))
    with pytest.raises(ValueError, match="domain 'a' overrides: unknown keys \\['foo'\\]"):
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
    for bad in ("[]", '["max", "rank"]'):
        with pytest.raises(ValueError, match=r"x\.toml: normalisations must be a non-empty list"):
            ExperimentConfig.load(write(tmp_path, f"normalisations = {bad}{dom}"))
    with pytest.raises(ValueError, match=r"x\.toml: normalisations must be of type list\[str\]"):
        ExperimentConfig.load(write(tmp_path, f'normalisations = "max"{dom}'))
    cfg = ExperimentConfig.load(write(tmp_path, f'normalisations = ["max", "minmax", "max"]{dom}'))
    assert cfg.normalisations == ["max", "minmax"]
    assert cfg.domains[0].hold_out == 0  # no third split unless asked
    labelled = '[[domains]]\nname="a"\npath="a"\ntrain="train"\nhold_out = 100'
    assert ExperimentConfig.load(write(tmp_path, labelled)).domains[0].hold_out == 100
    for bad, why in (("-1", "domain 'a': hold_out must be an integer >= 0"),
                     ('"10"', "number 1: hold_out must be of type int, got '10'")):  # fmt: skip
        with pytest.raises(ValueError, match=why):
            ExperimentConfig.load(write(tmp_path, labelled.replace("100", bad)))
    with pytest.raises(ValueError, match="domain 'a': hold_out needs labelled training queries"):
        ExperimentConfig.load(write(tmp_path, f"{dom}\nhold_out = 5"))
    assert cfg.min_lead_se == 0.0  # the best on dev, unless a config asks for a clear lead
    assert ExperimentConfig.load(write(tmp_path, f"min_lead_se = 1.64{dom}")).min_lead_se == 1.64
    assert ExperimentConfig.load(write(tmp_path, f"min_lead_se = 2{dom}")).min_lead_se == 2.0
    for bad, why in (("-1", r"x\.toml: min_lead_se must be in \[0, 10\]; got -1"),
                     ("nan", r"x\.toml: min_lead_se must be in \[0, 10\]; got nan"),
                     ('"1.64"', r"x\.toml: min_lead_se must be of type float")):  # fmt: skip
        with pytest.raises(ValueError, match=why):
            ExperimentConfig.load(write(tmp_path, f"min_lead_se = {bad}{dom}"))


@pytest.mark.slow
def test_every_train_setting_in_the_toml_reaches_the_expert(tmp_path):
    """The experiment trains through the library: settings the CLI has no flag for (here
    temperature, warmup_ratio, mine_depth, max_query_length) and its corpus runtime reach
    expert.json."""
    import json

    from routerretriever.devices import resolve_device
    from routerretriever.experiment import ExperimentConfig, train_all
    from tests.conftest import TINY

    config = tmp_path / "tiny.toml"
    config.write_text(
        f"""
store = "store"
results = "results"
cache_dir = "cache"
backend = "torch"
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
    assert tiny["corpus_runtime"] == "torch"  # mined over the runtime the tables use
    assert tiny["device"] == str(resolve_device("auto"))  # and where it trained
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
        ("[pseudo]\nmax_doc = 5", r"x\.toml: \[pseudo\]: unknown keys \['max_doc'\]; known: "),
        ("[bm25]\nfeedback_doc = 5", r"x\.toml: \[bm25\]: unknown keys \['feedback_doc'\]"),
        ("[bm25]\nfeedback_weight = 3", r"x\.toml: \[bm25\]: bm25 feedback_weight must be"),
        ("[bm25]\nk1 = -1", r"x\.toml: \[bm25\]: bm25 k1 must be"),
        ("bm25 = 3", r"x\.toml: bm25 must be of type dict"),
        ('[train]\nlr = "fast"', r"x\.toml: \[train\]: lr must be of type float, got 'fast'"),
        ("[bm25]\nfeedback_docs = true", r"\[bm25\]: feedback_docs must be of type int, got True"),
        ("seed = 1.5", r"x\.toml: seed must be of type int, got 1\.5"),
        ("data_root = []", r"x\.toml: data_root must be of type str, got \[\]"),
        ('routing_layers = [1, "2"]', r"routing_layers must be of type list\[int\]"),
        ("batch_size = 0", r"x\.toml: batch_size must be a positive integer"),
        ('data_root = "a\\u0000b"', r"x\.toml: data_root is not a usable path"),
        ('store = "a\\u0000b"', r"x\.toml: store is not a usable path"),
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


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('max_instance = 3\n[[domains]]\nname="a"\npath="a"', r"unknown keys \['max_instance'\]"),
        ('[[domains]]\nname="a"\npath="a"\ntrian="train"', r"number 1: unknown keys \['trian'\]"),
        ('[[domains]]\npath="a"', "number 1 needs a name and a path"),
        ('[[domains]]\nname="a"\npath=3', r"number 1: path must be of type str, got 3"),
    ],
)
def test_a_mistyped_key_is_named_not_ignored(tmp_path, text, message):
    """A typo must not silently fall back to a default (``trian`` would train on the corpus)."""
    with pytest.raises(ValueError, match=r"x\.toml: .*" + message):
        ExperimentConfig.load(write(tmp_path, text))


def toml_value(v) -> str:
    """A TOML inline value (JSON's strings are TOML basic strings; tables are inline)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


scalars = st.one_of(
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=8),
)
values = st.recursive(
    scalars,
    lambda c: st.one_of(
        st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=5), c, max_size=3)
    ),
    max_leaves=6,
)


def table_of(keys: list[str]):
    return st.dictionaries(st.sampled_from([*keys, "bogus"]), values, max_size=4)


domain = st.fixed_dictionaries(
    {"name": st.text(max_size=5), "path": st.text(max_size=5)},
    optional={
        "train": st.sampled_from(["train", "corpus", "none"]) | values,
        "hold_out": values,
        "overrides": table_of([f.name for f in fields(TrainConfig)]) | values,
    },
) | table_of(sorted(DOMAIN_KEYS))
config = st.fixed_dictionaries(
    {},
    optional={
        **{k: values for k in RAW_KEYS if k not in ("train", "pseudo", "bm25", "domains")},
        "train": table_of([f.name for f in fields(TrainConfig)]) | values,
        "pseudo": table_of([f.name for f in fields(PseudoQueryConfig)]) | values,
        "bm25": table_of([f.name for f in fields(BM25Config)]) | values,
        "domains": st.lists(domain, max_size=3) | values,
        "zzz": values,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=config)
def test_any_config_loads_or_names_its_file(raw):
    """Whatever a config holds, loading it gives settings or one ValueError naming the file."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.toml"
        path.write_text("\n".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in raw.items()))
        try:
            cfg = ExperimentConfig.load(path)
        except ValueError as e:
            assert str(e).startswith(str(path)) and len(str(e)) < 600
            return
        assert cfg.domains and all(isinstance(d.name, str) for d in cfg.domains)
        assert isinstance(cfg.train, TrainConfig) and isinstance(cfg.bm25, BM25Config)


@pytest.mark.parametrize("default", ["Base model + BM25 (α 0.4)", "RouterRetriever, gated"])
def test_zero_shot_table_names_each_system_once(default):
    """When dev picks base + BM25 itself as the default, its zero-shot row is not repeated."""
    from routerretriever.report import _pool_section

    scores = {"a": 0.5, "b": 0.4, "u": 0.3}
    pool = {
        "labelled_dev_domains": ["a"],
        "family_choice": {},
        "default": {"name": default, "average": 0.45, "zero_shot_average": 0.4},
        "baselines": {},
        "candidates": [],
        "alpha_if_chosen_on_all_dev": {},
        "base_fused": {"name": "Base model + BM25 (α 0.4)", "per_domain": scores},
        "gates": [],
        "growth": [],
    }
    pool["default"]["zero_shot"] = {k: v + 0.01 for k, v in scores.items()}
    md = "\n".join(_pool_section(pool, ["a", "b"], ["u"]))
    zero = md.split("### Zero-shot")[1].split("###")[0]
    rows = [line.split(" | ")[0].strip("| ") for line in zero.splitlines() if line.startswith("| ")]
    assert rows[1:] == sorted({"Base model + BM25 (α 0.4)", default}, key=lambda r: "Base" not in r)


def test_the_report_says_when_the_default_leads_within_noise_or_routes_nothing():
    from routerretriever.report import _pool_section

    scores = {"a": 0.5, "b": 0.4, "u": 0.3}
    base = "Base model + BM25 (α 0.5)"

    def section(default, margin, declines):
        pool = {
            "labelled_dev_domains": ["a"],
            "family_choice": {},
            "default": {
                "name": default,
                "average": 0.45,
                "zero_shot_average": 0.4,
                "zero_shot": scores,
                "dev_margin": {"over": base, **margin},
                "declines_every_expert": declines,
            },
            "baselines": {},
            "candidates": [],
            "alpha_if_chosen_on_all_dev": {},
            "base_fused": {"name": base, "per_domain": scores},
            "gates": [],
            "growth": [],
        }
        return "\n".join(_pool_section(pool, ["a", "b"], ["u"]))

    gated = "RouterRetriever (weighted), gated + BM25 (α 0.5)"
    md = section(gated, {"difference": 0.0072, "se": 0.0059, "within_noise": False}, False)
    assert f"it leads {base} by +0.72 (standard error 0.59)." in md
    assert "does not tell them apart" not in md and "declines every expert" not in md
    md = section(gated, {"difference": 0.004, "se": 0.0059, "within_noise": True}, True)
    assert "+0.40 (standard error 0.59): within one standard error" in md
    assert "its gate declines every expert" in md
    md = section(base, {"difference": 0.0, "se": 0.0, "within_noise": True}, False)
    assert "it leads" not in md  # the default is base + BM25 itself: nothing to compare
    from routerretriever.report import _margin_note

    kept = {
        "name": base,
        "best_on_dev": gated,
        "min_lead_se": 1.64,
        "dev_margin": {"over": base, "difference": 0.0072, "se": 0.0059, "within_noise": False},
    }
    assert _margin_note(kept) == (
        f"The best on dev was {gated}, leading by +0.72 (standard error 0.59): under 1.64 "
        "standard errors (the config's min_lead_se), so base + BM25 is the default."
    )
