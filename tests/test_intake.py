"""Intake of zips, folders and loose files, including hostile and broken archives."""

from __future__ import annotations

import io
import os
import shutil
import stat
import threading
import zipfile
from pathlib import Path

import pydicom
import pytest

from services.core.config import IntakeSettings, QualitySettings, SeriesSelectionSettings
from services.core.dicom import load_volume, read_studies, select_series
from services.core.intake import IntakeError, classify_file, collect_dicom_files
from services.core.intake.zip_archive import _open_member

LIMITS = IntakeSettings()


def _files_outside(root: Path, work_dir: Path) -> set[Path]:
    """Every file under ``root`` that is not inside ``work_dir``."""
    return {p for p in root.rglob("*") if p.is_file() and work_dir not in p.parents}


def _zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _chest_files(fixtures_dir: Path, count: int | None = None) -> list[Path]:
    files = sorted((fixtures_dir / "chest_ct_lung_dx_a0002").glob("*.dcm"))
    return files[:count] if count else files


# --- ordinary inputs --------------------------------------------------------------------


def test_folder_input_finds_every_dicom_file(fixtures_dir: Path, tmp_path: Path) -> None:
    result = collect_dicom_files(fixtures_dir / "chest_ct_lung_dx_a0002", tmp_path / "work", LIMITS)
    assert len(result.dicom_files) == 30
    assert result.summary.dicom_files == 30
    assert result.summary.files_total == 30
    assert result.summary.skipped_non_dicom == 0
    # Folder inputs are read in place: nothing is copied into the work directory.
    assert list((tmp_path / "work").iterdir()) == []


def test_dicomdir_files_are_ignored_and_counted(fixtures_dir: Path, tmp_path: Path) -> None:
    result = collect_dicom_files(fixtures_dir / "ct_scout_and_dose_screens", tmp_path / "w", LIMITS)
    # The Philips export holds two DIRFILE files: DICOMDIRs by their SOP class, not by name.
    assert result.summary.skipped_dicomdir == 2
    assert result.summary.dicom_files == 7
    assert all(path.name != "DIRFILE" for path in result.dicom_files)


def test_single_file_input(fixtures_dir: Path, tmp_path: Path) -> None:
    one = _chest_files(fixtures_dir, 1)[0]
    result = collect_dicom_files(one, tmp_path / "w", LIMITS)
    assert result.dicom_files == [one]
    assert result.summary.files_total == 1


def test_zip_with_odd_names_junk_dicomdir_nested_zip_and_no_preamble(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    chest = _chest_files(fixtures_dir)
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in chest[20:]:
            archive.write(path, arcname=f"inner folder/{path.name}")
    no_preamble = io.BytesIO()
    dataset = pydicom.dcmread(chest[19])
    del dataset.file_meta
    dataset.preamble = None
    pydicom.dcmwrite(
        no_preamble, dataset, implicit_vr=True, little_endian=True, enforce_file_format=False
    )
    assert no_preamble.getvalue()[128:132] != b"DICM"

    members: dict[str, bytes] = {}
    for index, path in enumerate(chest[:19]):
        folder = "Серия 1 (лёгкие)" if index % 2 else "scan with spaces/ü ñ"
        members[f"{folder}/снимок {index:02d}.dcm"] = path.read_bytes()
    members["raw/no_preamble_slice"] = no_preamble.getvalue()
    members["inner.zip"] = inner.getvalue()
    members["README.txt"] = b"exported by a PACS\n"
    members["thumbs/preview.png"] = b"\x89PNG\r\n\x1a\n" + b"\x00" * 200
    members["DICOMDIR"] = (
        fixtures_dir / "ct_scout_and_dose_screens" / "S1000" / "DIRFILE"
    ).read_bytes()
    archive_path = _zip(tmp_path / "study ü.zip", members)
    work_dir = tmp_path / "work"

    result = collect_dicom_files(archive_path, work_dir, LIMITS)

    summary = result.summary
    assert summary.dicom_files == 30
    assert summary.skipped_non_dicom == 2
    assert summary.skipped_dicomdir == 1
    assert summary.nested_archives == 1
    assert all(work_dir in path.parents for path in result.dicom_files)
    # The extracted nested zip is removed once its members are out.
    assert not [p for p in work_dir.rglob("*") if p.is_file() and p.name.endswith("inner.zip")]
    # The no-preamble file was accepted and its pixel data decodes in the volume.
    studies = read_studies(result.dicom_files, summary)
    assert len(studies) == 1
    assert studies[0].series[0].n_images == 30
    selection = select_series(studies[0], SeriesSelectionSettings())
    volume, report, _ = load_volume(selection.selected, QualitySettings())
    assert volume.shape == (30, 512, 512)
    assert report.missing_slices == 0
    assert _files_outside(tmp_path, work_dir) == {archive_path}


def test_classify_file(fixtures_dir: Path, tmp_path: Path) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("not a DICOM file\n" * 20)
    random_bytes = tmp_path / "blob.bin"
    random_bytes.write_bytes(os.urandom(4096))
    assert classify_file(junk) == "other"
    assert classify_file(random_bytes) == "other"
    assert classify_file(_chest_files(fixtures_dir, 1)[0]) == "dicom"
    dicomdir = fixtures_dir / "ct_scout_and_dose_screens" / "S1000" / "DIRFILE"
    assert classify_file(dicomdir) == "dicomdir"


def test_folder_symlink_is_not_followed(fixtures_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "input"
    folder.mkdir()
    for path in _chest_files(fixtures_dir, 3):
        shutil.copy(path, folder / path.name)
    outside = tmp_path / "secret.dcm"
    shutil.copy(_chest_files(fixtures_dir)[5], outside)
    (folder / "link.dcm").symlink_to(outside)
    result = collect_dicom_files(folder, tmp_path / "w", LIMITS)
    assert result.summary.dicom_files == 3
    assert outside not in result.dicom_files
    assert any("symbolic link" in problem for problem in result.summary.problems)


# --- inputs that must fail with a clear reason --------------------------------------------


def test_missing_input(tmp_path: Path) -> None:
    with pytest.raises(IntakeError, match="input not found"):
        collect_dicom_files(tmp_path / "nope.zip", tmp_path / "w", LIMITS)


def test_folder_without_dicom(tmp_path: Path) -> None:
    folder = tmp_path / "input"
    folder.mkdir()
    (folder / "a.txt").write_text("hello")
    (folder / "b.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 100)
    with pytest.raises(
        IntakeError, match=r"no DICOM image files or NIfTI volumes found \(2 files: 2 not DICOM\)"
    ) as caught:
        collect_dicom_files(folder, tmp_path / "w", LIMITS)
    assert caught.value.summary is not None
    assert caught.value.summary.skipped_non_dicom == 2


def test_empty_zip(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "empty.zip", {})
    with pytest.raises(IntakeError, match="empty archive"):
        collect_dicom_files(archive, tmp_path / "w", LIMITS)


def test_truncated_zip(fixtures_dir: Path, tmp_path: Path) -> None:
    whole = _zip(
        tmp_path / "whole.zip", {p.name: p.read_bytes() for p in _chest_files(fixtures_dir, 4)}
    )
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(IntakeError, match="truncated or corrupt"):
        collect_dicom_files(truncated, tmp_path / "w", LIMITS)


def test_corrupt_member_data(fixtures_dir: Path, tmp_path: Path) -> None:
    source = _chest_files(fixtures_dir, 1)[0]
    archive = _zip(tmp_path / "c.zip", {"a.dcm": source.read_bytes()})
    data = bytearray(archive.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)  # damage the compressed stream, keep the directory
    archive.write_bytes(bytes(data))
    with pytest.raises(IntakeError, match="truncated or corrupt"):
        collect_dicom_files(archive, tmp_path / "w", LIMITS)


def test_deflate_members_are_inflated_by_isal_with_the_same_bytes(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    """Deflate members go through ISA-L's inflater (twice zlib's speed), byte for byte."""
    source = _chest_files(fixtures_dir, 1)[0].read_bytes()
    archive = _zip(tmp_path / "d.zip", {"a.dcm": source})
    with zipfile.ZipFile(archive) as opened:
        (info,) = opened.infolist()
        with _open_member(opened, info, threading.Lock()) as member:
            assert type(member._decompressor).__module__.split(".")[0] in {
                "isal",
                "isal_zlib",
                "igzip_lib",
            }
            assert member.read() == source


def test_member_with_a_wrong_crc_is_refused(fixtures_dir: Path, tmp_path: Path) -> None:
    """A deflate stream that inflates cleanly to the wrong bytes: zipfile's CRC-32 check
    still runs on what the fast inflater produced."""
    archive = _zip(tmp_path / "crc.zip", {"a.dcm": _chest_files(fixtures_dir, 1)[0].read_bytes()})
    data = bytearray(archive.read_bytes())
    central = data.find(b"PK\x01\x02")
    for offset in (14, central + 16):  # CRC-32 in the local header and the central directory
        data[offset : offset + 4] = bytes(a ^ 0xFF for a in data[offset : offset + 4])
    archive.write_bytes(bytes(data))
    with pytest.raises(IntakeError, match=r"truncated or corrupt.*Bad CRC-32"):
        collect_dicom_files(archive, tmp_path / "w", LIMITS)
    assert not [p for p in (tmp_path / "w").rglob("*") if p.is_file()]


def test_encrypted_zip(fixtures_dir: Path, tmp_path: Path) -> None:
    archive = _zip(tmp_path / "e.zip", {"a.dcm": _chest_files(fixtures_dir, 1)[0].read_bytes()})
    # Python cannot write encrypted zips: set the "encrypted" flag bit in the local and the
    # central headers, which is what every reader looks at first.
    data = bytearray(archive.read_bytes())
    for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        position = data.find(signature)
        data[position + flag_offset] |= 0x01
    archive.write_bytes(bytes(data))
    with pytest.raises(IntakeError, match="encrypted"):
        collect_dicom_files(archive, tmp_path / "w", LIMITS)


def test_not_a_zip_despite_the_name(tmp_path: Path) -> None:
    fake = tmp_path / "study.zip"
    fake.write_text("this is not an archive")
    with pytest.raises(IntakeError, match="not a readable zip archive"):
        collect_dicom_files(fake, tmp_path / "w", LIMITS)


# --- extraction attacks -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        ("../escaped.dcm", "escapes"),
        ("ok/../../escaped.dcm", "escapes"),
        ("..\\escaped.dcm", "escapes"),
        ("/tmp/escaped_absolute.dcm", "absolute"),
        ("C:/escaped.dcm", "absolute"),
    ],
)
def test_path_escape_is_refused(
    member: str, reason: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    payload = _chest_files(fixtures_dir, 1)[0].read_bytes()
    archive = _zip(tmp_path / "evil.zip", {"good.dcm": payload, member: payload})
    work_dir = tmp_path / "sandbox" / "work"
    with pytest.raises(IntakeError, match=reason):
        collect_dicom_files(archive, work_dir, LIMITS)
    assert _files_outside(tmp_path, work_dir) == {archive}
    assert not Path("/tmp/escaped_absolute.dcm").exists()
    # The archive is refused before anything is written.
    assert [p for p in work_dir.rglob("*") if p.is_file()] == []


def test_symlink_member_is_refused(tmp_path: Path) -> None:
    archive_path = tmp_path / "link.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        info = zipfile.ZipInfo("passwd.dcm")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "/etc/passwd")
    work_dir = tmp_path / "work"
    with pytest.raises(IntakeError, match="symbolic link"):
        collect_dicom_files(archive_path, work_dir, LIMITS)
    assert _files_outside(tmp_path, work_dir) == {archive_path}


def test_zip_bomb_by_compression_ratio(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "bomb.zip", {"zeros.dcm": bytes(20 * 1024 * 1024)})
    with pytest.raises(IntakeError, match="compression ratio"):
        collect_dicom_files(archive, tmp_path / "w", LIMITS)
    assert [p for p in (tmp_path / "w").rglob("*") if p.is_file()] == []


def test_declared_size_that_lies_is_caught(tmp_path: Path) -> None:
    """A central directory that declares a tiny size for a large member."""
    real = os.urandom(300_000)
    archive = _zip(tmp_path / "liar.zip", {"big.dcm": real}, compression=zipfile.ZIP_STORED)
    data = bytearray(archive.read_bytes())
    central = data.find(b"PK\x01\x02")
    # Uncompressed size sits at offset 24 of the central directory header.
    data[central + 24 : central + 28] = (1000).to_bytes(4, "little")
    archive.write_bytes(bytes(data))
    work_dir = tmp_path / "w"
    with pytest.raises(IntakeError, match=r"truncated or corrupt|declared"):
        collect_dicom_files(archive, work_dir, LIMITS)
    written = sum(p.stat().st_size for p in work_dir.rglob("*") if p.is_file())
    assert written <= 1000


def test_uncompressed_size_limit_counts_across_nested_archives(tmp_path: Path) -> None:
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("a.bin", os.urandom(150_000))
    outer = _zip(tmp_path / "outer.zip", {"inner.zip": inner.getvalue()}, zipfile.ZIP_STORED)
    limits = IntakeSettings(max_uncompressed_bytes=250_000)
    with pytest.raises(IntakeError, match="max_uncompressed_bytes"):
        collect_dicom_files(outer, tmp_path / "w", limits)
    # The same input passes with room for both levels.
    with pytest.raises(IntakeError, match="no DICOM image files"):
        collect_dicom_files(outer, tmp_path / "w2", IntakeSettings(max_uncompressed_bytes=400_000))


def test_declared_total_over_the_limit_is_refused_before_extraction(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "big.zip", {"a.bin": os.urandom(300_000)}, zipfile.ZIP_STORED)
    with pytest.raises(IntakeError, match="declares"):
        collect_dicom_files(archive, tmp_path / "w", IntakeSettings(max_uncompressed_bytes=100_000))
    assert [p for p in (tmp_path / "w").rglob("*") if p.is_file()] == []


def test_file_count_limit(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "many.zip", {f"f{i}.txt": b"x" for i in range(30)})
    with pytest.raises(IntakeError, match="max_files"):
        collect_dicom_files(archive, tmp_path / "w", IntakeSettings(max_files=10))


def _nest(payload_name: str, payload: bytes, levels: int) -> bytes:
    """``levels`` zips inside each other, the innermost holding the payload."""
    data = payload
    name = payload_name
    for level in range(levels):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(name, data)
        data = buffer.getvalue()
        name = f"level{level}.zip"
    return data


def test_nested_zips_within_the_depth_limit(fixtures_dir: Path, tmp_path: Path) -> None:
    payload = _chest_files(fixtures_dir, 1)[0].read_bytes()
    archive = tmp_path / "nested.zip"
    archive.write_bytes(_nest("slice.dcm", payload, levels=3))
    result = collect_dicom_files(archive, tmp_path / "w", IntakeSettings(max_nesting_depth=3))
    assert result.summary.dicom_files == 1
    assert result.summary.nested_archives == 2
    assert result.dicom_files[0].read_bytes() == payload


def test_nested_zips_beyond_the_depth_limit(fixtures_dir: Path, tmp_path: Path) -> None:
    payload = _chest_files(fixtures_dir, 1)[0].read_bytes()
    archive = tmp_path / "deep.zip"
    archive.write_bytes(_nest("slice.dcm", payload, levels=4))
    with pytest.raises(IntakeError, match="nested more than 3 levels"):
        collect_dicom_files(archive, tmp_path / "w", IntakeSettings(max_nesting_depth=3))


# --- members inflated in parallel -------------------------------------------------------


def test_many_members_are_extracted_whole_and_in_order(fixtures_dir: Path, tmp_path: Path) -> None:
    sources = _chest_files(fixtures_dir)
    archive = _zip(tmp_path / "study.zip", {f"s/{p.name}": p.read_bytes() for p in sources})
    result = collect_dicom_files(archive, tmp_path / "w", LIMITS)
    assert len(result.dicom_files) == len(sources)
    for extracted, source in zip(result.dicom_files, sources, strict=True):
        assert extracted.name.endswith(source.name)
        assert extracted.read_bytes() == source.read_bytes()


def test_a_lying_member_among_many_stops_the_archive(tmp_path: Path) -> None:
    """Several threads extract; the one member whose size lies is still caught exactly."""
    members = {f"m{i:02d}.bin": os.urandom(200_000) for i in range(12)}
    archive = _zip(tmp_path / "liar.zip", members, compression=zipfile.ZIP_STORED)
    data = bytearray(archive.read_bytes())
    central = -1
    for _ in range(7):  # the central directory record of the 7th member
        central = data.find(b"PK\x01\x02", central + 1)
    data[central + 24 : central + 28] = (1000).to_bytes(4, "little")
    archive.write_bytes(bytes(data))
    work_dir = tmp_path / "w"
    with pytest.raises(IntakeError, match=r"member .m06\.bin.: (Bad CRC|.*declared)"):
        collect_dicom_files(archive, work_dir, LIMITS)
    written = {p.name: p.stat().st_size for p in work_dir.rglob("*") if p.is_file()}
    assert not any(name.endswith("m06.bin") for name in written)  # the partial file is gone
    assert all(size == 200_000 for size in written.values())  # no other member was cut short
