"""Fetching a BEIR collection, offline: from a local zip, md5-checked, unpacked safely."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from routerretriever import load_beir
from routerretriever.cli import main
from routerretriever.datasets import fetch
from routerretriever.errors import DataError
from tests.conftest import TINY


def zip_of(folder: Path, name: str, dest: Path, extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(dest, "w") as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, f"{name}/{f.relative_to(folder)}")
        for arc, data in (extra or {}).items():
            z.writestr(arc, data)
    return dest


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_a_checked_zip_becomes_a_beir_folder(tmp_path):
    archive = zip_of(TINY, "tiny", tmp_path / "tiny.zip")
    out = fetch("tiny", tmp_path / "data", source=archive, md5=md5(archive))
    assert out == tmp_path / "data" / "tiny"
    assert len(load_beir(out).corpus) == len(load_beir(TINY).corpus)


def test_a_wrong_checksum_writes_nothing(tmp_path):
    archive = zip_of(TINY, "tiny", tmp_path / "tiny.zip")
    with pytest.raises(DataError, match="does not match"):
        fetch("tiny", tmp_path / "data", source=archive, md5="0" * 32)
    assert not (tmp_path / "data" / "tiny").exists()


@pytest.mark.parametrize("evil", ["../evil.txt", "tiny/../../evil.txt", "/abs/evil.txt"])
def test_members_that_leave_the_folder_are_refused(tmp_path, evil):
    archive = zip_of(TINY, "tiny", tmp_path / "tiny.zip", {evil: b"x"})
    with pytest.raises(DataError, match="outside the dataset"):
        fetch("tiny", tmp_path / "data", source=archive, md5=md5(archive))
    assert not (tmp_path / "data" / "tiny").exists() and not (tmp_path / "evil.txt").exists()


def test_a_zip_that_is_not_beir_names_the_file(tmp_path):
    archive = zip_of(TINY, "tiny", tmp_path / "t.zip", {"tiny/qrels/dev.tsv": b"q\td\t0.5\n"})
    with pytest.raises(DataError, match=r"dev\.tsv"):
        fetch("tiny", tmp_path / "data", source=archive, md5=md5(archive))
    assert not (tmp_path / "data" / "tiny").exists()


def test_cli_data_get_refuses_a_file_that_is_not_the_published_zip(tmp_path, capsys):
    archive = zip_of(TINY, "scifact", tmp_path / "scifact.zip")
    assert main(["data", "get", "scifact", "--from", str(archive), "--to", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "does not match scifact's published 5f7d1de60b170fc8027bb7898e2efca1" in err
    assert main(["data", "get", "nope", "--to", str(tmp_path)]) == 2
    assert "unknown dataset 'nope'; known: arguana" in capsys.readouterr().err


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@example(names=[":", ":/a"])  # a file and a folder of one name: once a traceback
@given(names=st.lists(st.text(alphabet="ab./\\\\:~-_ ", min_size=1, max_size=12), max_size=4))
def test_any_member_names_stay_inside_or_are_refused(tmp_path, names):
    import shutil

    root = tmp_path / "case"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    extra = {n: b"x" for n in names}
    archive = zip_of(TINY, "tiny", root / "t.zip", extra)
    before = {p for p in tmp_path.rglob("*")}
    try:
        out = fetch("tiny", root / "data", source=archive, md5=md5(archive))
    except DataError:
        out = None
    written = {p for p in tmp_path.rglob("*")} - before
    allowed = (root / "data").resolve()
    assert all(p.resolve().is_relative_to(allowed) for p in written)
    if out is not None:
        assert load_beir(out).corpus
