"""The README's routing examples run as written (paths pointed at the tiny fixture's experts)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import TINY, tiny_model_path

README = Path(__file__).resolve().parent.parent / "README.md"


def block_after(marker: str) -> str:
    text = README.read_text()
    start = text.index(marker)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_the_saved_system_example_is_five_lines_and_runs(trained, tmp_path, monkeypatch):
    from routerretriever import Encoder, RouterRetriever
    from routerretriever.experts import load_expert
    from routerretriever.instances import Domain, build_pilot_library

    _, store, _ = trained
    monkeypatch.setenv("ROUTERRETRIEVER_CACHE", str(tmp_path / "cache"))
    enc = Encoder.load(tiny_model_path())
    for name in ("alpha", "beta"):
        load_expert(enc, store / name)
    pilots = build_pilot_library(enc, [Domain("tiny", TINY, "corpus")], max_instances=20)
    RouterRetriever(enc, pilots, alpha=0.5).save(tmp_path / "router")

    code = block_after("Routing with a saved system")
    assert len([line for line in code.splitlines() if line.strip()]) <= 5
    code = code.replace("examples/runs/demo/results/router", str(tmp_path / "router"))
    code = code.replace("examples/demo/med", str(TINY)).replace("print(", "shown = (")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    expert, members, lexical = scope["shown"]
    assert expert in ("alpha", "beta") and members[expert] == 1.0 and lexical == 0.5
    assert len(scope["run"]["q"]) == 5


def test_the_folder_of_experts_example_runs(trained, tmp_path, monkeypatch):
    _, store, _ = trained
    monkeypatch.setenv("ROUTERRETRIEVER_CACHE", str(tmp_path / "cache"))
    code = block_after("From a folder of experts")
    code = code.replace('("scifact", "med")', '("alpha", "beta")')
    code = code.replace("examples/runs/demo/experts", str(store))
    code = code.replace("Encoder.load()", f'Encoder.load("{tiny_model_path()}")')
    code = re.sub(r"domains = \[.*\]", f'domains = [Domain("tiny", "{TINY}", "corpus")]', code)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    rr = scope["rr"]
    assert sorted(rr.pilots.experts) == ["alpha", "beta"] and rr.route(["heart attack"])[0].expert
