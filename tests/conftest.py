from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny"
DEMO = ROOT / "examples" / "demo"
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def encoder():
    """The real all-MiniLM-L6-v2, loaded once per session (read-only in tests)."""
    from routerretriever import Encoder

    return Encoder.load()


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
