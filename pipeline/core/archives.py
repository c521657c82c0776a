"""Safe extraction of the Kaggle archives (zip and 7z) into the interim folder.

A download is untrusted input: an archive entry may point outside its folder (`../x`, `/etc/x`, a symlink:
the "zip-slip" family) or unpack to far more than it weighs (a zip bomb). Every entry is judged by name and
type before anything is written; refused entries are reported and never touched. The declared sizes and the
entry count are checked against the caps before extraction starts, and the bytes actually written are counted
while extracting, because a crafted header may lie about the sizes. An archive that passes a cap is stopped,
its partial output deleted, and `ArchiveError` says which cap and how to raise it.

7z goes through py7zr (pure Python), so nobody needs a `7z` binary. Each archive unpacks into its own folder
with a stamp file, so an unchanged archive is not unpacked twice when the stage is re-run by hand.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import py7zr
import py7zr.io

from pipeline.core.files import atomic_path

CHUNK = 1 << 20
STAMP = ".extracted.json"
# Files that archivers and file browsers add beside the data; never images, never worth a warning each.
JUNK_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}


class ArchiveError(RuntimeError):
    """An archive is unreadable, encrypted or passes a size/entry cap; nothing of it is left half-written."""


@dataclass
class Extraction:
    """What one archive gave: where it went, what was written, refused (with why) and skipped as junk."""

    archive: str
    dest: str
    files: int = 0
    bytes: int = 0
    refused: list[dict[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def is_junk(name: str) -> bool:
    """macOS resource forks, `__MACOSX/` trees and desktop litter: skipped silently, counted in the report."""
    parts = name.replace("\\", "/").split("/")
    base = parts[-1]
    return "__MACOSX" in parts or base in JUNK_NAMES or base.startswith("._")


def entry_problem(name: str, is_link: bool = False, is_special: bool = False) -> str | None:
    """Why an archive entry must not be extracted, or None when its name and type are safe."""
    if is_link:
        return "link entry (symlink or junction): links are never extracted"
    if is_special:
        return "not a regular file or folder (device, socket or junction)"
    if "\x00" in name:
        return "NUL byte in the entry name"
    norm = name.replace("\\", "/")  # a Windows archiver's separators must not smuggle '..' past the check
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        return "absolute path"
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        return "path leaves the archive folder ('..')"
    if not parts:
        return "empty entry name"
    return None


def _target(dest: Path, name: str) -> Path:
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    target = dest.joinpath(*parts)
    # Belt and braces after entry_problem: the resolved path must still lie under dest.
    if not target.resolve().is_relative_to(dest.resolve()):
        raise ArchiveError(f"entry {name!r} resolves outside {dest}")
    return target


class _Budget:
    """Bytes still allowed for one archive; shared by every entry so the total, not each file, is capped."""

    def __init__(self, archive: Path, max_bytes: int) -> None:
        self.archive, self.max_bytes, self.used = archive, max_bytes, 0

    def take(self, n: int) -> None:
        self.used += n
        if self.used > self.max_bytes:
            raise ArchiveError(
                f"{self.archive.name} unpacked past ingest.max_archive_bytes={self.max_bytes:,} while "
                "extracting (its headers understate the size: a zip bomb or a damaged file). "
                "If the archive is genuine, raise the cap in params.yaml; otherwise download it again."
            )


def _check_caps(archive: Path, n_entries: int, declared: int, max_bytes: int, max_entries: int) -> None:
    if n_entries > max_entries:
        raise ArchiveError(
            f"{archive} holds {n_entries:,} entries, more than ingest.max_archive_entries={max_entries:,}; "
            "not extracted. If the archive is genuine, raise the cap in params.yaml."
        )
    if declared > max_bytes:
        raise ArchiveError(
            f"{archive} would unpack to {declared:,} bytes, more than "
            f"ingest.max_archive_bytes={max_bytes:,}; not extracted. "
            "If the archive is genuine, raise the cap in params.yaml."
        )


def _copy(src, target: Path, budget: _Budget) -> int:
    """Stream one entry to `target` through a temporary name, counting every byte against the budget."""
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with atomic_path(target) as tmp, open(tmp, "wb") as out:
        while chunk := src.read(CHUNK):
            budget.take(len(chunk))
            out.write(chunk)
            written += len(chunk)
    return written


def _extract_zip(archive: Path, dest: Path, result: Extraction, max_bytes: int, max_entries: int) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(f"{archive} is not a readable zip archive ({exc}); download it again") from exc
    with zf:
        infos = zf.infolist()
        _check_caps(archive, len(infos), sum(i.file_size for i in infos), max_bytes, max_entries)
        budget = _Budget(archive, max_bytes)
        for info in infos:
            # Unix archivers keep the file type in the high 16 bits; DOS/Windows ones leave it 0 (regular).
            kind = stat.S_IFMT(info.external_attr >> 16)
            is_link = kind == stat.S_IFLNK
            special = kind not in (0, stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK)
            reason = entry_problem(info.filename, is_link=is_link, is_special=special)
            if reason:
                result.refused.append({"archive": archive.name, "entry": info.filename, "reason": reason})
                continue
            if info.is_dir():
                continue
            if is_junk(info.filename):
                result.ignored.append(info.filename)
                continue
            target = _target(dest, info.filename)
            try:
                with zf.open(info) as src:
                    result.bytes += _copy(src, target, budget)
                    result.files += 1
            except ArchiveError:
                raise
            except (zipfile.BadZipFile, zlib.error, RuntimeError, OSError, EOFError) as exc:
                # One damaged or encrypted member must not cost the rest of the archive.
                result.refused.append(
                    {"archive": archive.name, "entry": info.filename, "reason": f"unreadable entry: {exc}"}
                )


class _CappedWriter(py7zr.io.Py7zIO):
    """py7zr writes each member through this: a temporary file, every byte counted, renamed on completion."""

    def __init__(self, target: Path, budget: _Budget, result: Extraction) -> None:
        self.target, self.budget, self.result = target, budget, result
        target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = target.with_name(f".{target.name}.part")
        self.fh = open(self.tmp, "wb")  # noqa: SIM115 - closed in close(), which py7zr calls per member
        self.n = 0

    def write(self, s: bytes | bytearray) -> int:
        self.budget.take(len(s))
        self.n += len(s)
        return self.fh.write(s)

    def read(self, size: int | None = None) -> bytes:
        return b""

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.fh.tell()

    def flush(self) -> None:
        self.fh.flush()

    def size(self) -> int:
        return self.n

    def close(self) -> None:
        # py7zr calls close() only for a member that decompressed and passed its CRC.
        if not self.fh.closed:
            self.fh.close()
            os.replace(self.tmp, self.target)
            self.result.files += 1
            self.result.bytes += self.n


class _CappedFactory(py7zr.io.WriterFactory):
    def __init__(self, dest: Path, budget: _Budget, result: Extraction) -> None:
        self.dest, self.budget, self.result = dest.resolve(), budget, result

    def create(self, filename: str) -> py7zr.io.Py7zIO:
        target = Path(filename)
        if not target.is_absolute():
            target = self.dest / target
        if not target.resolve().is_relative_to(self.dest):
            raise ArchiveError(f"7z entry {filename!r} resolves outside {self.dest}")
        return _CappedWriter(target, self.budget, self.result)


def _extract_7z(archive: Path, dest: Path, result: Extraction, max_bytes: int, max_entries: int) -> None:
    try:
        # max_extract_size is py7zr's own running total: a second guard behind the writer's count.
        sz = py7zr.SevenZipFile(archive, mode="r", max_extract_size=max_bytes)
    except (py7zr.exceptions.Bad7zFile, py7zr.exceptions.ArchiveError, OSError, EOFError) as exc:
        raise ArchiveError(f"{archive} is not a readable 7z archive ({exc}); download it again") from exc
    with sz:
        if sz.needs_password():
            raise ArchiveError(f"{archive} is encrypted; the Kaggle files are not, so download it again")
        infos = sz.list()
        _check_caps(archive, len(infos), sum(i.uncompressed or 0 for i in infos), max_bytes, max_entries)
        targets = []
        for info in infos:
            special = not (info.is_file or info.is_directory or info.is_symlink)
            reason = entry_problem(info.filename, is_link=info.is_symlink, is_special=special)
            if reason:
                result.refused.append({"archive": archive.name, "entry": info.filename, "reason": reason})
            elif info.is_directory:
                continue
            elif is_junk(info.filename):
                result.ignored.append(info.filename)
            else:
                targets.append(info.filename)
        if not targets:
            return
        factory = _CappedFactory(dest, _Budget(archive, max_bytes), result)
        try:
            # Only the vetted names are targets: py7zr never opens an output for a refused entry.
            sz.extract(path=dest.resolve(), targets=targets, factory=factory)
        except ArchiveError:
            raise
        except py7zr.exceptions.DecompressionBombError as exc:
            raise ArchiveError(
                f"{archive.name} unpacked past ingest.max_archive_bytes={max_bytes:,} while extracting; "
                "if the archive is genuine, raise the cap in params.yaml"
            ) from exc
        except Exception as exc:  # py7zr raises a zoo of types for damaged archives
            raise ArchiveError(
                f"{archive} could not be extracted ({type(exc).__name__}: {exc}); download it again"
            ) from exc


def _stamp_key(archive: Path, max_bytes: int, max_entries: int) -> dict:
    st = archive.stat()
    return {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "max_bytes": max_bytes,
        "max_entries": max_entries,
    }


def extract(archive: Path, dest: Path, max_bytes: int, max_entries: int) -> Extraction:
    """Unpack `archive` (.zip or .7z) into `dest`, safely; reuse an earlier extraction of the same file."""
    archive, dest = Path(archive), Path(dest)
    key = _stamp_key(archive, max_bytes, max_entries)
    stamp = dest / STAMP
    if stamp.is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            saved = json.loads(stamp.read_text())
            if saved["key"] == key:
                return Extraction(**saved["result"])
    if dest.exists():
        shutil.rmtree(dest)  # stale or interrupted extraction: start clean so no old file survives
    dest.mkdir(parents=True)
    result = Extraction(archive=str(archive), dest=str(dest))
    name = archive.name.lower()
    try:
        if name.endswith(".zip"):
            _extract_zip(archive, dest, result, max_bytes, max_entries)
        elif name.endswith(".7z"):
            _extract_7z(archive, dest, result, max_bytes, max_entries)
        else:
            raise ArchiveError(f"{archive}: unsupported archive type (expected .zip or .7z)")
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    with atomic_path(stamp) as tmp, open(tmp, "w") as fh:
        json.dump({"key": key, "result": asdict(result)}, fh)
    return result
