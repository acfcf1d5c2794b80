"""Tar archives and NIfTI volumes for the malformed-input corpus (the kinds are in kinds.py).

Tars are written member by member with :mod:`tarfile`, so hostile entries (``..`` names,
absolute names, links, device files, FIFOs) are real tar headers whatever this machine
allows. NIfTI files are converted from the real DICOM fixtures by SimpleITK's own DICOM
series reader and NIfTI writer: an independent converter, so a chest NIfTI must give the
same model input as the chest series through the pipeline's own reader.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from corpus import builders as b

if TYPE_CHECKING:
    from corpus.kinds import Source

CHEST = "chest_ct_lung_dx_a0002"
MR = "mr_brain_t1"
SENTINEL = "sentinel"
TAR_BOMB_BYTES = 64 * 1024 * 1024


def _src(workspace: Path, name: str) -> Path:
    path = workspace / "src" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _input(workspace: Path, name: str) -> Path:
    path = workspace / "input" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _file_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    return info, data


def _special_member(name: str, kind: bytes, link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 5  # /dev/zero on Linux
    return info, b""


def write_tar(
    path: Path, members: Iterable[tuple[tarfile.TarInfo, bytes]], *, compressed: bool
) -> Path:
    options = {"compresslevel": 1} if compressed else {}
    with tarfile.open(path, "w:gz" if compressed else "w", **options) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def _chest_members(source: Source, prefix: str = "STUDY") -> list[tuple[tarfile.TarInfo, bytes]]:
    return [_file_member(f"{prefix}/{name}", data) for name, data in source.files(CHEST)]


def _escaping_name(workspace: Path) -> str:
    target = (workspace / SENTINEL / "escaped.dcm").resolve()
    return "../" * 40 + target.as_posix().lstrip("/")


# --- tar kinds --------------------------------------------------------------------------


def build_chest_tar(source: Source, workspace: Path) -> Path:
    return write_tar(_input(workspace, "study.tar"), _chest_members(source), compressed=False)


def build_chest_tgz(source: Source, workspace: Path) -> Path:
    return write_tar(_input(workspace, "study.tgz"), _chest_members(source), compressed=True)


def build_tar_in_zip(source: Source, workspace: Path) -> Path:
    inner = write_tar(_src(workspace, "study.tar.gz"), _chest_members(source), compressed=True)
    members = [("CD/README.txt", b"Burned by a PACS.\n"), ("CD/study.tar.gz", inner.read_bytes())]
    return b.zip_members(_input(workspace, "cd_export.zip"), members, stored=True)


def build_tar_too_deep(source: Source, workspace: Path) -> Path:
    """The chest tar inside a zip inside a tar inside a zip: four levels below the input."""
    payload = write_tar(_src(workspace, "l0.tar"), _chest_members(source), compressed=False)
    for level in range(1, 5):
        if level % 2:
            payload = b.zip_members(
                _src(workspace, f"l{level}.zip"), [("x.tar", payload.read_bytes())]
            )
        else:
            payload = write_tar(
                _src(workspace, f"l{level}.tar"),
                [_file_member("x.zip", payload.read_bytes())],
                compressed=False,
            )
    path = _input(workspace, "matryoshka.tar")
    path.write_bytes(payload.read_bytes())
    return path


def build_tar_slip(source: Source, workspace: Path) -> Path:
    members = _chest_members(source)
    members.append(_file_member(_escaping_name(workspace), source.files(CHEST)[0][1]))
    return write_tar(_input(workspace, "tar_slip.tar"), members, compressed=False)


def build_tar_absolute_path(source: Source, workspace: Path) -> Path:
    members = _chest_members(source)
    absolute = str((workspace / SENTINEL / "absolute.dcm").resolve())
    members.append(_file_member(absolute, source.files(CHEST)[0][1]))
    return write_tar(_input(workspace, "absolute.tar"), members, compressed=False)


def build_tar_symlink(source: Source, workspace: Path) -> Path:
    members = _chest_members(source)
    target = str((workspace / SENTINEL / "marker.txt").resolve())
    members.append(_special_member("STUDY/link.dcm", tarfile.SYMTYPE, target))
    return write_tar(_input(workspace, "symlink.tgz"), members, compressed=True)


def build_tar_hardlink(source: Source, workspace: Path) -> Path:
    members = _chest_members(source)
    members.append(_special_member("STUDY/hard.dcm", tarfile.LNKTYPE, "/etc/passwd"))
    return write_tar(_input(workspace, "hardlink.tar"), members, compressed=False)


def build_tar_device_file(source: Source, workspace: Path) -> Path:
    members = _chest_members(source)
    members.append(_special_member("STUDY/zero.dcm", tarfile.CHRTYPE))
    return write_tar(_input(workspace, "device.tar"), members, compressed=False)


def build_tar_fifo(source: Source, workspace: Path) -> Path:
    members = _chest_members(source)
    members.append(_special_member("STUDY/pipe.dcm", tarfile.FIFOTYPE))
    return write_tar(_input(workspace, "fifo.tar"), members, compressed=False)


def build_tar_bomb(source: Source, workspace: Path) -> Path:
    """64 MiB of zeros in a .tar.gz of about 65 KiB: refused while it inflates."""
    path = _input(workspace, "bomb.tar.gz")
    with (
        gzip.open(path, "wb", compresslevel=9) as stream,
        tarfile.open(fileobj=stream, mode="w|") as archive,
    ):
        info = tarfile.TarInfo("STUDY/slice.dcm")
        info.size = TAR_BOMB_BYTES
        archive.addfile(info, io.BytesIO(bytes(TAR_BOMB_BYTES)))
    return path


def build_truncated_tgz(source: Source, workspace: Path) -> Path:
    data = write_tar(_src(workspace, "study.tgz"), _chest_members(source), compressed=True)
    path = _input(workspace, "truncated.tgz")
    path.write_bytes(data.read_bytes()[: int(data.stat().st_size * 0.6)])
    return path


def build_truncated_tar(source: Source, workspace: Path) -> Path:
    data = write_tar(_src(workspace, "study.tar"), _chest_members(source), compressed=False)
    path = _input(workspace, "truncated.tar")
    # Cut inside a member's data (a multiple of 512 plus a bit): the member is short.
    path.write_bytes(data.read_bytes()[: int(data.stat().st_size * 0.6) // 512 * 512 + 100])
    return path


def build_empty_tar(source: Source, workspace: Path) -> Path:
    return write_tar(_input(workspace, "empty.tar"), [], compressed=False)


def build_zero_byte_tgz(source: Source, workspace: Path) -> Path:
    path = _input(workspace, "zero_bytes.tgz")
    path.write_bytes(b"")
    return path


# --- NIfTI kinds ------------------------------------------------------------------------


def fixture_image(source: Source, fixture: str) -> sitk.Image:
    """A fixture series read by SimpleITK's DICOM reader (its own geometry and rescale)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(source.fixtures_dir / fixture)))
    return reader.Execute()


def build_chest_nifti_gz(source: Source, workspace: Path) -> Path:
    path = _input(workspace, "chest.nii.gz")
    sitk.WriteImage(fixture_image(source, CHEST), str(path))
    return path


def build_chest_nifti_in_tgz(source: Source, workspace: Path) -> Path:
    nifti = _src(workspace, "chest.nii")
    sitk.WriteImage(fixture_image(source, CHEST), str(nifti))
    members = [_file_member("volumes/train_1_a_1.nii", nifti.read_bytes())]
    return write_tar(_input(workspace, "volumes.tgz"), members, compressed=True)


def build_mr_nifti(source: Source, workspace: Path) -> Path:
    path = _input(workspace, "brain.nii.gz")
    sitk.WriteImage(fixture_image(source, MR), str(path))
    return path


def build_nifti_4d(source: Source, workspace: Path) -> Path:
    """Two time points: a series of volumes, not one study."""
    import nibabel as nib

    data = np.zeros((16, 16, 12, 2), dtype=np.int16)
    path = _input(workspace, "dynamic.nii.gz")
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.0, 1.0])), path)
    return path


def build_truncated_nifti(source: Source, workspace: Path) -> Path:
    full = _src(workspace, "chest.nii")
    sitk.WriteImage(fixture_image(source, CHEST), str(full))
    path = _input(workspace, "truncated.nii")
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    return path


def build_nifti_bad_magic(source: Source, workspace: Path) -> Path:
    """A .nii whose header lost its magic: not taken for a NIfTI, so nothing to screen."""
    full = _src(workspace, "chest.nii")
    sitk.WriteImage(fixture_image(source, CHEST), str(full))
    data = bytearray(full.read_bytes())
    data[344:348] = b"XXXX"
    path = _input(workspace, "bad_magic.nii")
    path.write_bytes(bytes(data))
    return path


def build_nifti_huge_dimensions(source: Source, workspace: Path) -> Path:
    """A header declaring 4096^3 voxels over a few bytes of data: refused before reading."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((4096, 4096, 4096))
    header.set_data_dtype(np.int16)
    header.set_qform(np.eye(4), code=1)
    data = header.binaryblock + b"\0" * 4 + b"\0" * 1024
    path = _input(workspace, "huge.nii")
    path.write_bytes(data)
    return path
