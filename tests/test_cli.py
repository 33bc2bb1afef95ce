from __future__ import annotations

import json

from routerretriever.cli import main


def test_evaluate_prints_table_and_writes_json(tiny, tmp_path, capsys):
    out = tmp_path / "scores.json"
    assert (
        main(["evaluate", str(tiny), "--cache-dir", str(tmp_path / "c"), "--json", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "| dataset" in printed and "ndcg@10" in printed and "tiny" in printed
    report = json.loads(out.read_text())["tiny"]
    assert 0.0 < report["scores"]["ndcg@10"] <= 1.0
    assert report["queries"] == 10 and len(report["per_query"]) == 10


def test_user_mistakes_are_one_line_errors(tiny, tmp_path, capsys):
    assert main(["evaluate", str(tiny), "--split", "dev"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unknown split 'dev'" in err and "Traceback" not in err
    (tiny / "queries.jsonl").write_text("{oops\n")
    assert main(["evaluate", str(tiny), "--cache-dir", str(tmp_path)]) == 2
    assert "queries.jsonl:1: not valid JSON" in capsys.readouterr().err
    assert main(["evaluate", str(tiny), "--metrics", "ndcg@x"]) == 2
    assert "unknown metric" in capsys.readouterr().err
