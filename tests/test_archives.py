"""Safe extraction: escaping names and links refused and never written, caps enforced before and during."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import py7zr
import pytest

from pipeline.core import archives
from pipeline.core.archives import ArchiveError, entry_problem, extract
from tests.downloads import write_7z, write_zip

BIG = 10**9


def _all_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


@pytest.mark.parametrize(
    ("name", "link", "expected"),
    [
        ("train/ALB/img_1.jpg", False, None),
        ("./train/img.jpg", False, None),
        ("../evil.jpg", False, ".."),
        ("train/../../evil.jpg", False, ".."),
        ("..\\evil.jpg", False, ".."),
        ("/etc/passwd", False, "absolute"),
        ("C:/Windows/evil.jpg", False, "absolute"),
        ("train/ALB/link.jpg", True, "link"),
        ("", False, "empty"),
    ],
)
def test_entry_problem(name, link, expected):
    reason = entry_problem(name, is_link=link)
    assert (reason is None) if expected is None else (expected in reason)


def test_zip_refuses_escaping_entries_and_links_and_writes_nothing_outside(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    absolute = tmp_path / f"abs_evil_{uuid.uuid4().hex}.jpg"
    arc = write_zip(
        work / "train.zip",
        {
            "train/ALB/img_1.jpg": b"one",
            "train/BET/img_2.jpg": b"two",
            "../evil.jpg": b"evil",
            "train/../../evil2.jpg": b"evil",
            str(absolute): b"evil",
            "__MACOSX/train/._img_1.jpg": b"junk",
        },
        links={"train/ALB/link.jpg": "/etc/passwd"},
    )
    dest = work / "out" / "train"
    res = extract(arc, dest, BIG, 1000)
    assert _all_files(dest) == {"train/ALB/img_1.jpg", "train/BET/img_2.jpg", archives.STAMP}
    assert (dest / "train/ALB/img_1.jpg").read_bytes() == b"one"
    refused = {r["entry"]: r["reason"] for r in res.refused}
    assert set(refused) == {"../evil.jpg", "train/../../evil2.jpg", str(absolute), "train/ALB/link.jpg"}
    assert "absolute" in refused[str(absolute)] and "link" in refused["train/ALB/link.jpg"]
    assert res.ignored == ["__MACOSX/train/._img_1.jpg"]
    assert res.files == 2 and res.bytes == 6
    # Nothing landed beside the destination, in the work folder or in tmp_path's parent.
    for folder in (dest.parent, work, tmp_path, tmp_path.parent):
        assert not list(folder.glob("evil*")), folder
    assert not absolute.exists()
    assert not any(p.is_symlink() for p in tmp_path.rglob("*"))


def test_7z_refuses_escaping_entries_and_links(tmp_path):
    arc = write_7z(
        tmp_path / "test_stg2.7z",
        tmp_path / "src",
        {"test_stg2/image_1.jpg": b"img", "../evil7z.jpg": b"evil"},
        links={"test_stg2/link.jpg": "/etc/passwd"},
    )
    dest = tmp_path / "out" / "test_stg2"
    res = extract(arc, dest, BIG, 1000)
    assert _all_files(dest) == {"test_stg2/image_1.jpg", archives.STAMP}
    assert {r["entry"] for r in res.refused} == {"../evil7z.jpg", "test_stg2/link.jpg"}
    assert not list(tmp_path.rglob("evil7z.jpg")) and not list(tmp_path.parent.glob("evil7z.jpg"))
    assert not any(p.is_symlink() for p in (tmp_path / "out").rglob("*"))


@pytest.mark.parametrize("kind", ["zip", "7z"])
def test_caps_stop_an_archive_before_extracting(tmp_path, kind):
    entries = {f"train/ALB/img_{i}.jpg": b"x" * 1000 for i in range(5)}
    arc = (
        write_zip(tmp_path / "a.zip", entries)
        if kind == "zip"
        else write_7z(tmp_path / "a.7z", tmp_path / "src", entries)
    )
    dest = tmp_path / "out"
    with pytest.raises(ArchiveError, match="max_archive_entries"):
        extract(arc, dest, BIG, 4)
    assert not dest.exists()
    with pytest.raises(ArchiveError, match="max_archive_bytes"):
        extract(arc, dest, 4999, 1000)
    assert not dest.exists()
    assert extract(arc, dest, 5000, 5).files == 5  # exactly at the caps is allowed


@pytest.mark.parametrize("kind", ["zip", "7z"])
def test_bytes_are_counted_while_extracting_when_headers_lie(tmp_path, kind, monkeypatch):
    entries = {f"train/ALB/img_{i}.jpg": os.urandom(50_000) for i in range(4)}
    arc = (
        write_zip(tmp_path / "a.zip", entries)
        if kind == "zip"
        else write_7z(tmp_path / "a.7z", tmp_path / "src", entries)
    )
    # Pretend the declared sizes passed the check, as a crafted header would make them.
    monkeypatch.setattr(archives, "_check_caps", lambda *a, **k: None)
    # And switch off py7zr's own running total, so the count in our writer is what stops it.
    real = py7zr.SevenZipFile
    monkeypatch.setattr(py7zr, "SevenZipFile", lambda *a, max_extract_size=None, **k: real(*a, **k))
    dest = tmp_path / "out"
    with pytest.raises(ArchiveError, match="while extracting"):
        extract(arc, dest, 120_000, 1000)
    assert not dest.exists()  # the partial output is gone


def test_unchanged_archive_is_not_extracted_twice(tmp_path, monkeypatch):
    arc = write_zip(tmp_path / "train.zip", {"train/ALB/img_1.jpg": b"one"})
    first = extract(arc, tmp_path / "out", BIG, 10)

    def boom(*a, **k):
        raise AssertionError("extracted again")

    monkeypatch.setattr(archives, "_extract_zip", boom)
    assert extract(arc, tmp_path / "out", BIG, 10) == first
    with pytest.raises(AssertionError):
        extract(arc, tmp_path / "out", BIG, 11)  # different caps: the stamp no longer matches


@pytest.mark.parametrize("name", ["broken.zip", "broken.7z"])
def test_unreadable_archive_is_a_clear_error(tmp_path, name):
    arc = tmp_path / name
    arc.write_bytes(b"this is not an archive at all")
    with pytest.raises(ArchiveError, match="download it again"):
        extract(arc, tmp_path / "out", BIG, 10)
    assert not (tmp_path / "out").exists()


def test_damaged_zip_member_is_refused_and_the_rest_extracted(tmp_path):
    arc = write_zip(tmp_path / "train.zip", {"train/ALB/a.jpg": b"a" * 5000, "train/ALB/b.jpg": b"b" * 5000})
    data = bytearray(arc.read_bytes())
    start = data.find(b"train/ALB/a.jpg") + len("train/ALB/a.jpg")
    data[start + 5 : start + 15] = b"\xff" * 10  # corrupt the first member's deflate stream
    arc.write_bytes(bytes(data))
    res = extract(arc, tmp_path / "out", BIG, 10)
    assert (tmp_path / "out/train/ALB/b.jpg").read_bytes() == b"b" * 5000
    assert [r["entry"] for r in res.refused] == ["train/ALB/a.jpg"]
    assert not (tmp_path / "out/train/ALB/a.jpg").exists()
