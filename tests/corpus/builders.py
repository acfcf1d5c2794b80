"""Low-level tools that turn the real DICOM fixtures into broken, hostile or odd inputs.

Nothing here knows what the pipeline should answer; the catalogue in ``kinds.py`` does.
Every DICOM file written through :func:`write_datasets` carries the distinctive patient
values below, so that the privacy test can look for them in everything the product writes.
"""

from __future__ import annotations

import copy
import stat
import struct
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.datadict import dictionary_VR, keyword_dict
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.tag import Tag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

# Distinctive values: none of them can appear anywhere by chance.
PATIENT_NAME = "Zzyzx^Privacy"
PATIENT_ID = "PID-98765-XYZ"
PATIENT_BIRTH_DATE = "19010203"
PATIENT_VALUES = (PATIENT_NAME, PATIENT_ID, PATIENT_BIRTH_DATE)

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"


# --- reading and writing DICOM ---------------------------------------------------------


def stamp_patient(dataset: Dataset) -> Dataset:
    dataset.PatientName = PATIENT_NAME
    dataset.PatientID = PATIENT_ID
    dataset.PatientBirthDate = PATIENT_BIRTH_DATE
    return dataset


def write_datasets(
    datasets: Iterable[Dataset],
    folder: Path,
    *,
    name: str = "IM{index:04d}.dcm",
    preamble: bool = True,
) -> list[Path]:
    """Write the data sets as files ``folder/<name>``; ``preamble=False`` drops preamble and prefix."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, dataset in enumerate(datasets):
        stamp_patient(dataset)
        path = folder / name.format(index=index)
        # The file meta is written as it is; only the preamble and "DICM" come and go.
        if not preamble:
            dataset.preamble = None
        elif getattr(dataset, "preamble", None) is None:
            dataset.preamble = b"\0" * 128
        dataset.save_as(path, enforce_file_format=False)
        paths.append(path)
    return paths


def file_meta(sop_class: str, sop_instance: str, syntax: str = ExplicitVRLittleEndian) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def set_sop_class(dataset: Dataset, sop_class: str) -> None:
    dataset.SOPClassUID = sop_class
    dataset.file_meta.MediaStorageSOPClassUID = sop_class


def renew_uids(datasets: Sequence[Dataset], seed: str) -> str:
    """Give the data sets a new study, series, frame of reference and instance UIDs.

    Deterministic for a seed, so a copy of a fixture becomes a different study. Returns
    the new StudyInstanceUID.
    """
    study_uid = generate_uid(entropy_srcs=[seed, "study"])
    series_uids: dict[str, str] = {}
    for index, dataset in enumerate(datasets):
        old_series = str(dataset.get("SeriesInstanceUID", ""))
        series_uids.setdefault(old_series, generate_uid(entropy_srcs=[seed, "series", old_series]))
        dataset.StudyInstanceUID = study_uid
        dataset.SeriesInstanceUID = series_uids[old_series]
        dataset.FrameOfReferenceUID = generate_uid(entropy_srcs=[seed, "frame", old_series])
        sop_uid = generate_uid(entropy_srcs=[seed, "instance", str(index)])
        dataset.SOPInstanceUID = sop_uid
        if getattr(dataset, "file_meta", None) is not None:
            dataset.file_meta.MediaStorageSOPInstanceUID = sop_uid
    return study_uid


def duplicate_instance(dataset: Dataset, seed: str) -> Dataset:
    """A copy of one image with its own SOPInstanceUID (a resent or re-exported slice)."""
    twin = copy.deepcopy(dataset)
    sop_uid = generate_uid(entropy_srcs=[seed, str(dataset.SOPInstanceUID)])
    twin.SOPInstanceUID = sop_uid
    twin.file_meta.MediaStorageSOPInstanceUID = sop_uid
    return twin


def set_position(dataset: Dataset, position: Sequence[float]) -> None:
    dataset.ImagePositionPatient = [decimal_string(v) for v in position]
    if "SliceLocation" in dataset:
        dataset.SliceLocation = decimal_string(position[2])


def position_of(dataset: Dataset) -> np.ndarray:
    return np.asarray([float(v) for v in dataset.ImagePositionPatient], dtype=np.float64)


def sort_by_height(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Axial images from the lowest (feet) to the highest (head) slice."""
    return sorted(datasets, key=lambda ds: position_of(ds)[2])


def set_pixels(dataset: Dataset, pixels: np.ndarray, *, signed: bool) -> None:
    """Replace the pixel data with an uncompressed 16-bit image."""
    dataset.Rows, dataset.Columns = (int(n) for n in pixels.shape)
    dataset.BitsAllocated = 16
    dataset.BitsStored = 16
    dataset.HighBit = 15
    dataset.PixelRepresentation = 1 if signed else 0
    dtype = "<i2" if signed else "<u2"
    info = np.iinfo(np.dtype(dtype))
    if pixels.min() < info.min or pixels.max() > info.max:
        raise ValueError(f"pixel values do not fit {dtype}")
    dataset.PixelData = np.ascontiguousarray(pixels).astype(dtype).tobytes()
    for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue"):
        if keyword in dataset:
            del dataset[keyword]


def set_raw(dataset: Dataset, keyword: str, value: bytes) -> None:
    """Store bytes as they are, bypassing pydicom's checks (e.g. "abc" in a DS element)."""
    tag = Tag(keyword_dict[keyword])
    vr = dictionary_VR(tag)
    dataset[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


def hounsfield(dataset: Dataset) -> np.ndarray:
    """Stored values x slope + intercept, as float64."""
    slope = float(dataset.get("RescaleSlope", 1) or 1)
    intercept = float(dataset.get("RescaleIntercept", 0) or 0)
    return dataset.pixel_array.astype(np.float64) * slope + intercept


def to_implicit_vr(dataset: Dataset) -> None:
    dataset.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian


def damage_compressed_frame(dataset: Dataset, keep_fraction: float = 0.5) -> None:
    """Cut the (single) compressed frame short, as an interrupted transfer would."""
    frame = next(generate_frames(dataset.PixelData, number_of_frames=1))
    keep = max(16, int(len(frame) * keep_fraction)) & ~1  # fragments have an even length
    dataset.PixelData = encapsulate([frame[:keep]])


def replace_vr(path: Path, tag: int, vr: bytes, new_vr: bytes) -> None:
    """Overwrite the VR of one explicit-VR element in a file with other bytes."""
    marker = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    data = path.read_bytes()
    start = data.index(marker)
    path.write_bytes(data[: start + 4] + new_vr + data[start + 6 :])


def first_member_data_offset(archive: Path) -> int:
    """Where the first member's (compressed) data starts in a zip file."""
    data = archive.read_bytes()
    name_length, extra_length = struct.unpack("<HH", data[26:30])
    return 30 + name_length + extra_length


def truncate_file(path: Path, keep_fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


# --- non-image and other-modality objects ----------------------------------------------


def new_instance(
    reference: Dataset, seed: str, sop_class: str, modality: str, *, series_number: str
) -> Dataset:
    """Instance 1 of ``sop_class`` in a series of its own of the reference's study, its UIDs
    derived from ``seed`` and the modality."""
    kind = modality.lower()
    sop_uid = generate_uid(entropy_srcs=[seed, kind])
    ds = Dataset()
    ds.file_meta = file_meta(sop_class, sop_uid)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.Modality = modality
    ds.StudyInstanceUID = reference.StudyInstanceUID
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[seed, f"{kind}-series"])
    ds.SeriesNumber = series_number
    ds.InstanceNumber = "1"
    return ds


def text_report(reference: Dataset, seed: str) -> Dataset:
    """A Basic Text SR object of the reference's study (no Rows/Columns: not an image)."""
    ds = new_instance(reference, seed, BASIC_TEXT_SR, "SR", series_number="900")
    ds.StudyDate = reference.get("StudyDate", "")
    ds.ValueType = "CONTAINER"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    concept = Dataset()
    concept.CodeValue = "121070"
    concept.CodingSchemeDesignator = "DCM"
    concept.CodeMeaning = "Findings"
    ds.ConceptNameCodeSequence = [concept]
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.ConceptNameCodeSequence = [concept]
    item.TextValue = "Spiculated mass in the right upper lobe."
    ds.ContentSequence = [item]
    return ds


def segmentation(reference: Dataset, seed: str, frames: int = 4) -> Dataset:
    """A binary Segmentation object on the reference's grid (an image SOP class, not CT)."""
    ds = new_instance(reference, seed, SEGMENTATION_STORAGE, "SEG", series_number="901")
    ds.FrameOfReferenceUID = reference.get("FrameOfReferenceUID", generate_uid())
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.SegmentationType = "BINARY"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = int(reference.Rows)
    ds.Columns = int(reference.Columns)
    ds.NumberOfFrames = frames
    ds.BitsAllocated = 1
    ds.BitsStored = 1
    ds.HighBit = 0
    ds.PixelRepresentation = 0
    mask = np.zeros((frames, ds.Rows, ds.Columns), dtype=np.uint8)
    mask[:, ds.Rows // 3 : ds.Rows // 2, ds.Columns // 3 : ds.Columns // 2] = 1
    ds.PixelData = np.packbits(mask.reshape(-1), bitorder="little").tobytes()
    return ds


def as_other_modality(dataset: Dataset, modality: str, sop_class: str) -> None:
    """Rewrite a CT image as another modality's image (projection radiograph, ultrasound)."""
    dataset.Modality = modality
    set_sop_class(dataset, sop_class)
    dataset.ImageType = ["ORIGINAL", "PRIMARY"]
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "SliceLocation"):
        if keyword in dataset:
            del dataset[keyword]


def multiframe(datasets: Sequence[Dataset], seed: str) -> Dataset:
    """The slices packed into one multi-frame object of the Enhanced CT SOP class.

    Only the attributes the pipeline's series rules look at are filled in; a real Enhanced
    CT object also carries per-frame functional groups.
    """
    first = copy.deepcopy(datasets[0])
    set_sop_class(first, ENHANCED_CT_STORAGE)
    first.SOPInstanceUID = first.file_meta.MediaStorageSOPInstanceUID = generate_uid(
        entropy_srcs=[seed, "enhanced"]
    )
    first.NumberOfFrames = len(datasets)
    first.PixelData = b"".join(ds.PixelData for ds in datasets)
    return first


# --- archives --------------------------------------------------------------------------


def zip_tree(
    folder: Path,
    archive: Path,
    *,
    prefix: str = "",
    stored: bool = False,
    method: int | None = None,
) -> Path:
    """Zip every file under ``folder`` as ``prefix/relative/path``, as PACS exports do."""
    if method is None:
        method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    archive.parent.mkdir(parents=True, exist_ok=True)
    # Level 1: a fifth of the default level's time, and exports are deflated all the same.
    with zipfile.ZipFile(archive, "w", method, compresslevel=1) as handle:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                relative = path.relative_to(folder).as_posix()
                handle.write(path, f"{prefix}/{relative}" if prefix else relative)
    return archive


def zip_members(
    archive: Path,
    members: Iterable[tuple[str | zipfile.ZipInfo, bytes]],
    *,
    stored: bool = False,
    level: int = 1,
) -> Path:
    method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w", method, compresslevel=level) as handle:
        for name, data in members:
            handle.writestr(name, data, compress_type=method)
    return archive


def symlink_member(name: str, target: str) -> zipfile.ZipInfo:
    """A zip entry that unpacks (with ``unzip``) as a symbolic link to ``target``."""
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix: external_attr carries st_mode
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@dataclass(frozen=True)
class RawMember:
    """One member of a hand-written zip: the bytes after its local header and what it declares."""

    name: str | bytes  # bytes: stored as they are (they may not be valid UTF-8)
    payload: bytes
    crc: int
    file_size: int
    method: int = zipfile.ZIP_STORED
    flags: int = 0
    version_needed: int = 20  # "version needed to extract", x 10

    @property
    def name_bytes(self) -> bytes:
        return self.name if isinstance(self.name, bytes) else self.name.encode("utf-8")


def write_raw_zip(
    archive: Path, members: Sequence[RawMember], *, extra_central_names: Sequence[str] = ()
) -> Path:
    """Write a zip byte by byte, so that it can declare what the zipfile module never would.

    ``extra_central_names`` adds central-directory records that all point at the first
    member's local header: the overlapping-entries construction of non-recursive zip bombs.
    """
    body = bytearray()
    central = bytearray()
    offsets = []
    for member in members:
        offsets.append(len(body))
        name = member.name_bytes
        body += _local_header(member, name) + member.payload
        central += _central_record(member, name, offsets[-1])
    for extra in extra_central_names:
        central += _central_record(members[0], extra.encode("utf-8"), offsets[0])
    count = len(members) + len(extra_central_names)
    if count > 0xFFFF:
        raise ValueError("too many records for a zip without zip64")
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(central), len(body), 0)
    archive.parent.mkdir(parents=True, exist_ok=True)
    archive.write_bytes(bytes(body + central + end))
    return archive


# A member as both its local header and its central record describe it: version needed,
# flags, method, time, date, CRC, sizes and the name's length.
MEMBER_FIELDS = "HHHHHIIIH"


def _member_fields(member: RawMember, name: bytes) -> tuple[int, ...]:
    flags = member.flags | 0x800  # 0x800: the name is UTF-8
    sizes = (len(member.payload), member.file_size, len(name))
    return (member.version_needed, flags, member.method, 0, 0x21, member.crc, *sizes)


def _local_header(member: RawMember, name: bytes) -> bytes:
    fields = _member_fields(member, name)
    return struct.pack(f"<I{MEMBER_FIELDS}H", 0x04034B50, *fields, 0) + name


def _central_record(member: RawMember, name: bytes, offset: int) -> bytes:
    fields = _member_fields(member, name)
    trailer = (0, 0, 0, 0, 0, offset)  # extra, comment, disk, attributes, local header offset
    return struct.pack(f"<IH{MEMBER_FIELDS}HHHHII", 0x02014B50, 20, *fields, *trailer) + name


def deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate, as zip stores it
    return compressor.compress(data) + compressor.flush()


def encrypted_member(name: str, plaintext: bytes, password: bytes, seed: int = 0) -> RawMember:
    """A deflated member encrypted with the traditional PKWARE cipher (what ``zip -e`` does)."""
    crc = zlib.crc32(plaintext) & 0xFFFFFFFF
    header = bytearray(np.random.default_rng(seed).integers(0, 256, 11, dtype=np.uint8).tobytes())
    header.append(crc >> 24)  # the check byte readers use to verify the password
    cipher = _ZipCrypto(password)
    payload = cipher.encrypt(bytes(header) + deflate(plaintext))
    return RawMember(
        name=name,
        payload=payload,
        crc=crc,
        file_size=len(plaintext),
        method=zipfile.ZIP_DEFLATED,
        flags=0x1,
    )


def _crc_table() -> list[int]:
    table = []
    for index in range(256):
        value = index
        for _ in range(8):
            value = (value >> 1) ^ 0xEDB88320 if value & 1 else value >> 1
        table.append(value)
    return table


_CRC_TABLE = _crc_table()


class _ZipCrypto:
    """The traditional PKWARE stream cipher (APPNOTE 6.1), encryption side."""

    def __init__(self, password: bytes) -> None:
        self.keys = [0x12345678, 0x23456789, 0x34567890]
        for byte in password:
            self._update(byte)

    def _crc(self, crc: int, byte: int) -> int:
        return _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)

    def _update(self, byte: int) -> None:
        k0, k1, k2 = self.keys
        k0 = self._crc(k0, byte)
        k1 = ((k1 + (k0 & 0xFF)) * 134775813 + 1) & 0xFFFFFFFF
        k2 = self._crc(k2, (k1 >> 24) & 0xFF)
        self.keys = [k0, k1, k2]

    def encrypt(self, data: bytes) -> bytes:
        out = bytearray()
        for byte in data:
            temp = (self.keys[2] | 2) & 0xFFFF
            out.append(byte ^ (((temp * (temp ^ 1)) >> 8) & 0xFF))
            self._update(byte)
        return bytes(out)


def decimal_string(value: float) -> str:
    """A DS value (at most 16 characters) for a number in mm."""
    text = f"{float(value):.6f}".rstrip("0").rstrip(".")
    return text if text not in ("-0", "") else "0"
