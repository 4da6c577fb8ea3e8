"""Reading the BEIR format: a corpus, queries and qrels, from a folder or BEIR's zip.

BEIR format (Thakur et al. 2021): ``corpus.jsonl`` (``_id``, ``title``, ``text``),
``queries.jsonl`` (``_id``, ``text``), ``qrels/<split>.tsv`` (``query-id  corpus-id  score``,
header line). ``locate`` finds the folder (or extracts the zip into the cache once, or downloads
it when asked); ``read_beir`` reads it into a ``BEIRData``; ``write_beir`` writes one back (a
subset, test data). A file that is missing, empty or damaged raises a one-line KdkitError naming
the file (and the line).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kdkit.datamodules.archives import extract_once, file_error, warn_cached
from kdkit.errors import KdkitError, unreadable

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"


@dataclass
class BEIRData:
    """A BEIR dataset in memory.

    Args:
        doc_ids, doc_texts: corpus, in file order; a text is ``title + " " + text`` stripped (as
            BEIR's and MTEB's sentence-transformers evaluation build it).
        queries: query id -> text.
        qrels: split -> query id -> doc id -> relevance.
    """

    doc_ids: list[str]
    doc_texts: list[str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)

    def fingerprint(self) -> str:
        digest = hashlib.sha1()
        for did, text in zip(self.doc_ids, self.doc_texts):
            digest.update(f"{did}\t{text}\n".encode())
        for qid, text in self.queries.items():
            digest.update(f"{qid}\t{text}\n".encode())
        digest.update(json.dumps(self.qrels, sort_keys=True).encode())
        return digest.hexdigest()

    def split_qrels(self, split: str) -> dict[str, dict[str, int]]:
        if split not in self.qrels:
            raise KdkitError(f"qrels split {split!r} not found; this dataset has: {', '.join(sorted(self.qrels))}")
        return self.qrels[split]


BEIR_HINT = "fix the file or re-download the dataset"
EMPTY_HINT = "re-download the dataset, or point data.path at a complete BEIR folder"


def _bad_line(path: Path, line: int, what: str, reason: str) -> KdkitError:
    return unreadable(f"{path} line {line}", what, reason, BEIR_HINT)


def _read_jsonl(path: Path, what: str) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` of every non-blank line of a JSON-lines file. A file that
    cannot be read, or a line that is not a JSON object with an ``_id``, raises a one-line
    KdkitError naming the file (and line) as ``what``."""
    number = 0
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise _bad_line(path, number, what, f"not valid JSON: {err.msg} (column "
                                                        f"{err.colno})") from None
                if not isinstance(obj, dict) or "_id" not in obj:
                    raise _bad_line(path, number, what, 'not a JSON object with an "_id"')
                yield number, obj
    except UnicodeDecodeError as err:
        raise file_error(f"{path} (after line {number})", what, err,
                         f"it is not UTF-8 text: {BEIR_HINT}") from None
    except OSError as err:
        raise file_error(path, what, err, f"it is corrupt or truncated: {BEIR_HINT}") from None


def _text(obj: dict, key: str, path: Path, line: int, what: str, required: bool = False) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise _bad_line(path, line, what, f'"{key}" is {"missing" if value is None else "not a string"}')
    return value


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    what = "BEIR qrels"
    split: dict[str, dict[str, int]] = {}
    try:
        with open(path, encoding="utf-8") as f:
            rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            try:
                if next(rows, None) is None:  # header: query-id corpus-id score
                    raise file_error(path, what, "empty file", EMPTY_HINT)
                for row in rows:
                    if not any(cell.strip() for cell in row):
                        continue
                    if len(row) < 3:
                        raise _bad_line(path, rows.line_num, what, f"{len(row)} tab-separated fields, "
                                        "not 3 (query-id, corpus-id, score)")
                    try:
                        score = int(row[2])
                    except ValueError:
                        raise _bad_line(path, rows.line_num, what,
                                        f"score {row[2][:20]!r} is not a whole number") from None
                    split.setdefault(row[0], {})[row[1]] = score
            except csv.Error as err:  # e.g. a NUL byte: not a text file
                raise _bad_line(path, rows.line_num, what, f"{type(err).__name__}: {err}") from None
    except UnicodeDecodeError as err:
        raise file_error(path, what, err, f"it is not UTF-8 text: {BEIR_HINT}") from None
    except OSError as err:
        raise file_error(path, what, err, f"it is corrupt or truncated: {BEIR_HINT}") from None
    return split


def read_beir(folder: str | os.PathLike) -> BEIRData:
    """Read a BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/*.tsv``).

    A file that is missing, empty, unreadable, or has a bad line raises a one-line KdkitError
    naming the file (and the line).
    """
    folder = Path(folder)
    for name in ("corpus.jsonl", "queries.jsonl", "qrels"):
        if not (folder / name).exists():
            raise KdkitError(f"{folder} is not a BEIR folder: {name} is missing")
    doc_ids, doc_texts = [], []
    path, what = folder / "corpus.jsonl", "BEIR corpus"
    for line, doc in _read_jsonl(path, what):
        doc_ids.append(str(doc["_id"]))
        title, text = _text(doc, "title", path, line, what), _text(doc, "text", path, line, what)
        doc_texts.append((title + " " + text).strip())
    if not doc_ids:
        raise file_error(path, what, "empty file: no passages", EMPTY_HINT)
    queries = {}
    path, what = folder / "queries.jsonl", "BEIR queries"
    for line, q in _read_jsonl(path, what):
        queries[str(q["_id"])] = _text(q, "text", path, line, what, required=True)
    if not queries:
        raise file_error(path, what, "empty file: no queries", EMPTY_HINT)
    qrels = {path.stem: _read_qrels(path) for path in sorted((folder / "qrels").glob("*.tsv"))}
    return BEIRData(doc_ids, doc_texts, queries, qrels)


def write_beir(data: BEIRData, folder: str | os.PathLike, titles: dict[str, str] | None = None) -> Path:
    """Write ``data`` as a BEIR folder (e.g. a subset for a quick experiment, or test data).

    ``doc_texts`` are written as ``text`` with the title from ``titles`` (default: empty), so
    ``read_beir`` gives back ``(title + " " + text).strip()``.
    """
    folder = Path(folder)
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    titles = titles or {}
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as f:
        for did, text in zip(data.doc_ids, data.doc_texts):
            f.write(json.dumps({"_id": did, "title": titles.get(did, ""), "text": text}) + "\n")
    with open(folder / "queries.jsonl", "w", encoding="utf-8") as f:
        for qid, text in data.queries.items():
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    for split, rels in data.qrels.items():
        with open(folder / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for qid, docs in rels.items():
                for did, rel in docs.items():
                    f.write(f"{qid}\t{did}\t{rel}\n")
    return folder


def _extract(archive: Path, dest: Path) -> Path:
    return extract_once([archive], dest, what="BEIR zip")


def _beir_folder(root: Path) -> Path:
    """The folder holding ``corpus.jsonl`` at or one level under ``root`` (BEIR zips nest one)."""
    if (root / "corpus.jsonl").is_file():
        return root
    found = sorted(p.parent for p in root.glob("*/corpus.jsonl"))
    if len(found) != 1:
        raise KdkitError(f"expected one BEIR folder (with corpus.jsonl) in {root}, found {len(found)}")
    return found[0]


def locate(name: str | None, path: str | None, data_dir: str | None, cache_dir: str,
           download: bool = False, url: str = BEIR_URL) -> Path:
    """The BEIR folder to read, extracting a zip into ``cache_dir`` once.

    Looks at ``path`` (a folder or a zip), else ``<data_dir>/beir/<name>`` then
    ``<data_dir>/beir/<name>.zip``, else downloads BEIR's zip when ``download`` is true.
    """
    cache = Path(cache_dir).expanduser() / "beir"
    candidates = [Path(path).expanduser()] if path else []
    if not path and name and data_dir:
        base = Path(data_dir).expanduser() / "beir"
        candidates += [base / name, base / f"{name}.zip"]
    for candidate in candidates:
        if candidate.is_dir():
            return _beir_folder(candidate)
        if candidate.is_file() and candidate.suffix == ".zip":
            return _beir_folder(_extract(candidate, cache / candidate.stem))
    if path:
        raise KdkitError(f"data.path={path} is neither a BEIR folder nor a .zip")
    if not name:
        raise KdkitError("set data.name (e.g. scifact) or data.path (a BEIR folder or zip)")
    if not download:
        where = ", ".join(str(c) for c in candidates) or "(no data_dir)"
        raise KdkitError(f"BEIR dataset {name!r} not found at {where}: set KDKIT_DATA_DIR to the folder "
                         f"holding beir/{name}.zip, data.path to a BEIR folder/zip, or data.download=true")
    archive = cache / f"{name}.zip"
    if archive.is_file():  # downloaded before: say so, in case the data dir was meant
        warn_cached(", ".join(str(c) for c in candidates) or "(no data_dir)", archive,
                    f"BEIR dataset {name!r}")
    else:
        archive.parent.mkdir(parents=True, exist_ok=True)
        tmp = archive.with_suffix(f".zip.{os.getpid()}.part")
        try:
            urllib.request.urlretrieve(url.format(name=name), tmp)
        except OSError as exc:
            raise KdkitError(f"download of {url.format(name=name)} failed: {exc}") from exc
        tmp.replace(archive)
    return _beir_folder(_extract(archive, cache / name))
