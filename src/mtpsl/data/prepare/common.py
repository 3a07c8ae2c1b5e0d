"""What every ``mtpsl data prepare`` shares: input hashes, resumable writes, the manifest.

A prepare run writes each output file atomically (:func:`mtpsl.core.files.atomic_write`) and
then appends its size and sha256 to ``OUT/.prepare/journal.jsonl`` (fsynced). A killed run
leaves finished files plus their journal lines; the next run with the same inputs and options
skips every file whose size and sha256 still match its line and makes the rest, so the tree
ends byte-identical to an uninterrupted run's. At the end it writes

- ``prepare.files.sha256``: ``sha256  path`` of every output file (``sha256sum -c`` reads it),
- ``prepare.inputs.sha256``: the same for every input file (paths relative to the input),
- ``prepare.json``: tool and library versions, options, the digests of both listings (the
  "tree hash"), counts, the order images were taken in and the hypotheses applied,

and removes the journal. Nothing in these files depends on where the folders are or when the
run happened, so two users compare their copies by ``output.sha256`` alone. A rerun on a
finished folder verifies it against the listing (and remakes only what changed).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from mtpsl.core.errors import DataError
from mtpsl.core.faults import fault_point
from mtpsl.core.files import atomic_write, write_text

MANIFEST = "prepare.json"
FILES_LISTING = "prepare.files.sha256"
INPUTS_LISTING = "prepare.inputs.sha256"
STATE_DIR = ".prepare"
FORMAT = "mtpsl-prepare/1"
_CHUNK = 1 << 20
_TEMP = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")  # what atomic_write leaves when killed

SOURCES: dict[str, str] = {
    "nyu_depth_v2_labeled.mat": (
        "the NYU Depth V2 labelled set (2.8 GB, MATLAB v7.3): "
        "http://horatio.cs.nyu.edu/mit/silberman/nyu_depth_v2/nyu_depth_v2_labeled.mat"),
    "splits.mat": (
        "the official 795/654 split: http://horatio.cs.nyu.edu/mit/silberman/indoor_seg_sup/"
        "splits.mat (identical copies in github.com/ankurhanda/nyuv2-meta-data and "
        "github.com/VainF/nyuv2-python-toolkit; sha256 6e081404...a580cee)"),
    "normals_gt": (
        "Eigen & Fergus' normals (what MTAN used): https://cs.nyu.edu/~deigen/dnl/normals_gt.tgz "
        "(dead; a Wayback Machine copy, web.archive.org/web/20220412033406/"
        "https://cs.nyu.edu/~deigen/dnl/normals_gt.tgz, was reported to work); or FAIR's "
        "all_normals.pklz inside https://dl.fbaipublicfiles.com/fair_self_supervision_benchmark/"
        "nyuv2_surfacenormal_metadata.zip; or --normals from-depth (no download)"),
    "cityscapes": (
        "the Cityscapes packages leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip, "
        "disparity_trainvaltest.zip and camera_trainvaltest.zip from "
        "https://www.cityscapes-dataset.com/downloads/ (login required; cityscapesscripts' "
        "`csDownload PACKAGE` fetches one and checks its md5), unzipped into one folder"),
    "PASCAL_MT": (
        "the PASCAL-Context multi-task benchmark folder: "
        "https://data.vision.ee.ethz.ch/kmaninis/share/MTL/PASCAL_MT.tgz (tar xzf PASCAL_MT.tgz)"),
}
"""Where each official input comes from (printed when one is missing; nothing is fetched)."""


def missing(path: Path, what: str, source: str) -> DataError:
    """The error for an input that is not there, with where the official file comes from."""
    return DataError(f"{path} does not exist ({what}); get {SOURCES[source]}")


def sha256_file(path: Path, bar: Any = None) -> str:
    """sha256 of a file read in 1 MiB chunks (never whole in memory); ``bar`` counts bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fp:
        while chunk := fp.read(_CHUNK):
            digest.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return digest.hexdigest()


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "it") -> Any:
    """A tqdm bar on stderr (off when ``enabled`` is False or stderr is not a terminal)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=None if enabled else True,
                unit_scale=unit == "B", leave=False, dynamic_ncols=True)


def versions(libraries: Iterable[str]) -> dict[str, str]:
    """Versions of mtpsl, Python and the libraries whose code shapes the output."""
    from mtpsl import __version__

    out = {"mtpsl": __version__, "python": platform.python_version()}
    for name in libraries:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def npy_bytes(arr: np.ndarray) -> bytes:
    """The bytes ``np.save`` writes (format 1.0: deterministic for one array and dtype)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def write_bytes(path: Path, data: bytes) -> None:
    """:func:`atomic_write` of ``data``."""
    atomic_write(path, lambda f: f.write(data))


def _listing(entries: Mapping[str, tuple[int, str]]) -> str:
    return "".join(f"{entries[name][1]}  {name}\n" for name in sorted(entries))


def _read_listing(path: Path, root: Path) -> dict[str, tuple[int, str]]:
    entries: dict[str, tuple[int, str]] = {}
    for line in path.read_text().splitlines():
        digest, _, name = line.partition("  ")
        target = root / name
        if name and target.is_file():
            entries[name] = (target.stat().st_size, digest)
    return entries


@dataclass
class Summary:
    """What a prepare run did (printed by the CLI; the manifest holds no run statistics)."""

    out: Path
    files: int
    bytes: int
    written: int
    kept: int
    tree_sha256: str
    manifest: Path
    notes: list[str] = field(default_factory=list)


class PrepareRun:
    """One resumable prepare into ``out``.

    Args:
        out: the output folder (created; must be empty, or hold this very prepare).
        dataset: the dataset's name, recorded in the manifest.
        options: everything that changes the output (sizes, modes): part of the run's key.
        inputs: (name recorded in the listing, file) of every input file.
        libraries: distributions whose versions are recorded (and keyed).
        in_place: ``out`` is the input folder itself (PASCAL_MT): it need not be empty and
            only the files this run writes make up its output listing.
        progress: show tqdm bars (on a terminal).
    """

    def __init__(
        self,
        out: Path,
        dataset: str,
        options: Mapping[str, Any],
        inputs: Sequence[tuple[str, Path]],
        *,
        libraries: Iterable[str] = ("numpy",),
        in_place: bool = False,
        progress: bool = True,
    ) -> None:
        self.out = Path(out)
        self.dataset = dataset
        self.options = dict(options)
        self.in_place = in_place
        self.progress = progress
        self.tool = versions(libraries)
        self.inputs = self._hash_inputs(inputs)
        self.inputs_listing = _listing(self.inputs)
        self.key = hashlib.sha256(json.dumps(
            {"format": FORMAT, "dataset": dataset, "options": self.options, "tool": self.tool,
             "inputs": hashlib.sha256(self.inputs_listing.encode()).hexdigest()},
            sort_keys=True).encode()).hexdigest()
        self.state = self.out / STATE_DIR
        self.journal = self.state / "journal.jsonl"
        self.entries: dict[str, tuple[int, str]] = {}
        self.planned: set[str] = set()
        self.written = 0
        self.kept = 0
        self._open_state()

    # -- inputs and state ----------------------------------------------------------------
    def _hash_inputs(self, inputs: Sequence[tuple[str, Path]]) -> dict[str, tuple[int, str]]:
        names = [name for name, _ in inputs]
        if len(set(names)) != len(names):
            raise ValueError("input names must be unique")
        total = sum(path.stat().st_size for _, path in inputs)
        out: dict[str, tuple[int, str]] = {}
        with progress_bar(total, "hashing inputs", self.progress, unit="B") as bar:
            for name, path in inputs:
                out[name] = (path.stat().st_size, sha256_file(path, bar))
        return out

    def _open_state(self) -> None:
        manifest = self.out / MANIFEST
        if self.journal.is_file():
            lines = self.journal.read_bytes().split(b"\n")
            try:
                key = json.loads(lines[0])["key"]
            except (ValueError, KeyError, TypeError):
                key = None
            if key == self.key:
                for line in lines[1:]:
                    try:
                        self.entries.update({k: (int(v[0]), str(v[1]))
                                             for k, v in json.loads(line).items()})
                    except (ValueError, TypeError, IndexError, AttributeError):
                        continue  # a line torn by a kill: its files are made again
                self._trim_torn_line()
                return
            if not self.in_place:  # in place (PASCAL_MT) the few outputs are simply remade
                raise DataError(
                    f"{self.out} holds an unfinished prepare of other inputs, options or tool "
                    f"versions ({self.journal}); finish it with the same command, or delete "
                    "the folder to start over")
        elif manifest.is_file():
            try:
                key = json.loads(manifest.read_text()).get("key")
            except (ValueError, AttributeError):
                key = None
            if key != self.key and not self.in_place:
                raise DataError(
                    f"{self.out} already holds a prepared copy made from other inputs, options "
                    f"or tool versions ({manifest}); choose another --out or delete it")
            listing = self.out / FILES_LISTING
            if listing.is_file() and key == self.key:
                self.entries = _read_listing(listing, self.out)
        elif not self.in_place and self.out.exists() and any(self.out.iterdir()):
            raise DataError(f"{self.out} is not empty and was not made by mtpsl data prepare; "
                            "choose an empty or new --out folder")
        self.state.mkdir(parents=True, exist_ok=True)
        header = [json.dumps({"key": self.key})]
        if self.entries:  # a finished copy being verified: a kill now loses nothing
            header.append(json.dumps({k: list(v) for k, v in self.entries.items()}))
        write_text(self.journal, "\n".join(header) + "\n")

    def _trim_torn_line(self) -> None:
        data = self.journal.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.journal, "r+b") as fp:
                fp.truncate(data.rfind(b"\n") + 1)

    # -- items -----------------------------------------------------------------------------
    def done(self, names: Iterable[str]) -> bool:
        """True when every file of ``names`` exists with the size and sha256 journaled for
        it (then the item is skipped); records the names as planned output either way."""
        names = list(names)
        self.planned.update(names)
        for name in names:
            entry = self.entries.get(name)
            path = self.out / name
            if entry is None or not path.is_file() or path.stat().st_size != entry[0]:
                return False
            if sha256_file(path) != entry[1]:
                return False
        self.kept += 1
        return True

    def write(self, files: Mapping[str, bytes | np.ndarray]) -> None:
        """Write one item's files atomically, then journal them (one fsynced line)."""
        record: dict[str, tuple[int, str]] = {}
        for name, content in files.items():
            data = npy_bytes(content) if isinstance(content, np.ndarray) else content
            write_bytes(self.out / name, data)
            record[name] = (len(data), hashlib.sha256(data).hexdigest())
        self.planned.update(record)
        self.entries.update(record)
        with open(self.journal, "ab") as fp:
            fp.write(json.dumps({k: list(v) for k, v in record.items()}).encode() + b"\n")
            fp.flush()
            os.fsync(fp.fileno())
        self.written += 1
        fault_point("prepare:item")

    def items(self, total: int, desc: str, unit: str = "img") -> Any:
        """A progress bar for the item loop."""
        return progress_bar(total, desc, self.progress, unit=unit)

    # -- the end -----------------------------------------------------------------------------
    def _output_files(self) -> Iterator[Path]:
        skip = {MANIFEST, FILES_LISTING, INPUTS_LISTING}
        for dirpath, dirnames, filenames in os.walk(self.out):
            here = Path(dirpath)
            if here == self.out:
                dirnames[:] = [d for d in dirnames if d != STATE_DIR]
            for name in filenames:
                path = here / name
                if here == self.out and name in skip:
                    continue
                if _TEMP.fullmatch(name):
                    path.unlink(missing_ok=True)  # left by a killed atomic write
                    continue
                yield path

    def finish(self, details: Mapping[str, Any]) -> Summary:
        """Write the listings and ``prepare.json``; remove the journal."""
        if not self.in_place:
            for path in self._output_files():
                rel = path.relative_to(self.out).as_posix()
                if rel not in self.planned:
                    raise DataError(f"{path}: not written by this prepare (a stray file in the "
                                    "output folder); remove it and run the command again")
        outputs = {name: self.entries[name] for name in self.planned}
        listing = _listing(outputs)
        write_text(self.out / FILES_LISTING, listing)
        write_text(self.out / INPUTS_LISTING, self.inputs_listing)
        tree = hashlib.sha256(listing.encode()).hexdigest()
        manifest = {
            "format": FORMAT,
            "dataset": self.dataset,
            "tool": self.tool,
            "options": self.options,
            "inputs": {"files": len(self.inputs),
                       "bytes": sum(size for size, _ in self.inputs.values()),
                       "sha256": hashlib.sha256(self.inputs_listing.encode()).hexdigest(),
                       "listing": INPUTS_LISTING},
            "output": {"files": len(outputs), "bytes": sum(s for s, _ in outputs.values()),
                       "sha256": tree, "listing": FILES_LISTING},
            **details,
            "key": self.key,
        }
        path = self.out / MANIFEST
        write_text(path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        shutil.rmtree(self.state, ignore_errors=True)
        return Summary(self.out, len(outputs), manifest["output"]["bytes"], self.written,
                       self.kept, tree, path)


def describe(summary: Summary, what: str) -> str:
    """The lines a prepare command prints: what it wrote and where."""
    mib = summary.bytes / 2**20
    lines = [f"wrote {what} to {summary.out}: {summary.files} files, {mib:.1f} MiB "
             f"({summary.written} items made, {summary.kept} already there and verified)",
             f"  manifest {summary.manifest}",
             f"  file hashes {summary.out / FILES_LISTING} (sha256sum -c reads it), "
             f"input hashes {summary.out / INPUTS_LISTING}",
             f"  tree sha256 {summary.tree_sha256}"]
    return "\n".join(lines)
