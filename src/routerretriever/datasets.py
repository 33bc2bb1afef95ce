"""Public BEIR collections, fetched from BEIR's download location and checked before use.

``fetch("scifact", "data/beir")`` downloads ``scifact.zip``, checks its md5 against the one BEIR
publishes, unpacks it (refusing any member that would land outside the target) into a temporary
folder, checks it reads as a BEIR folder, and only then renames it to ``data/beir/scifact``: an
interrupted fetch leaves nothing that looks like a dataset. ``source=`` takes a zip already on
disk instead (machines without internet: download it elsewhere, copy it over).

The paper experiment's classic collections (Cranfield, CISI, MED, ADI) are not BEIR downloads;
they come from the Glasgow IR test collections in their own format, not handled here.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from routerretriever.data import available_splits, load_corpus, load_qrels, load_queries
from routerretriever.errors import DataError
from routerretriever.files import atomic_dir

logger = logging.getLogger(__name__)

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"
#: md5 of each public BEIR zip, as BEIR's README publishes them.
BEIR_MD5 = {
    "msmarco": "444067daf65d982533ea17ebd59501e4",
    "trec-covid": "ce62140cb23feb9becf6270d0d1fe6d1",
    "nfcorpus": "a89dba18a62ef92f7d323ec890a0d38d",
    "nq": "d4d3d2e48787a744b6f6e691ff534307",
    "hotpotqa": "f412724f78b0d91183a0e86805e16114",
    "fiqa": "17918ed23cd04fb15047f73e6c3bd9d9",
    "arguana": "8ad3e3c2a5867cdced806d6503f29b99",
    "webis-touche2020": "46f650ba5a527fc69e0a6521c5a23563",
    "cqadupstack": "4e41456d7df8ee7760a7f866133bda78",
    "quora": "18fb154900ba42a600f84b839c173167",
    "dbpedia-entity": "c2a39eb420a3164af735795df012ac2c",
    "scidocs": "38121350fc3a4d2f48850f6aff52e4a9",
    "fever": "5a818580227bfb4b35bb6fa46d9b6c03",
    "climate-fever": "8b66f0a9126c521bae2bde127b4dc99d",
    "scifact": "5f7d1de60b170fc8027bb7898e2efca1",
}
_CHUNK = 1 << 20

Progress = Callable[[int, int | None], None]  # (bytes so far, total or None)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _download(url: str, dest: Path, progress: Progress | None) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as out:
            total = int(r.headers.get("Content-Length") or 0) or None
            done = 0
            for block in iter(lambda: r.read(_CHUNK), b""):
                out.write(block)
                done += len(block)
                if progress:
                    progress(done, total)
    except OSError as e:  # URLError, timeouts, refused connections
        raise DataError(
            f"cannot download {url} ({getattr(e, 'reason', e)}); without internet, fetch the "
            "zip elsewhere and pass it with --from FILE"
        ) from None


def _unpack(archive: Path, name: str, into: Path) -> None:
    """Extract ``archive`` into ``into`` (the folder named ``name`` inside it becomes ``into``)."""
    try:
        with zipfile.ZipFile(archive) as z:
            root = into.resolve()
            for member in z.infolist():
                parts = Path(member.filename).parts
                if parts and parts[0] == name:
                    parts = parts[1:]
                if not parts or member.is_dir():
                    continue
                dest = (root / Path(*parts)).resolve()
                if not dest.is_relative_to(root) or ".." in parts:
                    raise DataError(f"{member.filename!r} would land outside the dataset", archive)
                try:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(member) as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out)
                except OSError as e:  # e.g. a file and a folder of one name
                    raise DataError(
                        f"{member.filename[:200]!r} cannot be unpacked ({e.strerror or e})", archive
                    ) from None
    except zipfile.BadZipFile:
        raise DataError("not a zip archive", archive) from None


def fetch(
    name: str,
    to: str | Path,
    *,
    source: str | Path | None = None,
    md5: str | None = None,
    progress: Progress | None = None,
) -> Path:
    """``to/name``: the BEIR collection ``name``, downloaded (or read from the zip ``source``),
    md5-checked (``md5`` overrides BEIR's published one), unpacked and checked as BEIR."""
    if md5 is None:
        if name not in BEIR_MD5:
            raise DataError(f"unknown dataset {name!r}; known: {', '.join(sorted(BEIR_MD5))}")
        md5 = BEIR_MD5[name]
    target = Path(to) / name
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(source) if source is not None else Path(tmp) / f"{name}.zip"
        if source is None:
            url = BEIR_URL.format(name=name)
            logger.info("downloading %s", url)
            _download(url, archive, progress)
        elif not archive.is_file():
            raise DataError("no such file", archive)
        got = _md5(archive)
        if got != md5:
            raise DataError(
                f"md5 {got} does not match {name}'s published {md5}: a damaged or different "
                "download; nothing was written",
                archive,
            )

        def fill(folder: Path) -> None:
            _unpack(archive, name, folder)
            load_corpus(folder)  # reads as BEIR, or says which file and line are wrong
            load_queries(folder)
            for split in available_splits(folder):
                load_qrels(folder, split)

        atomic_dir(target, fill)
    logger.info("%s ready in %s", name, target)
    return target
