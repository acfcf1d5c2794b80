"""What the listener accepts: storage SOP classes and transfer syntaxes (presentation contexts).

Images of the modalities a PACS sends with a chest CT (CT, MR, CR, DX, secondary captures)
and the structured reports that travel with studies (dose reports, earlier results), in the
transfer syntaxes PACS and modalities use. The pipeline decodes all of them (pydicom with the
pylibjpeg plugins); the files are stored exactly as received.
"""

from __future__ import annotations

from typing import Final

from pydicom import uid

IMAGE_STORAGE: Final[tuple[str, ...]] = (
    uid.CTImageStorage,
    uid.EnhancedCTImageStorage,
    uid.LegacyConvertedEnhancedCTImageStorage,
    uid.MRImageStorage,
    uid.EnhancedMRImageStorage,
    uid.LegacyConvertedEnhancedMRImageStorage,
    uid.ComputedRadiographyImageStorage,
    uid.DigitalXRayImageStorageForPresentation,
    uid.DigitalXRayImageStorageForProcessing,
    uid.SecondaryCaptureImageStorage,
    uid.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    uid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    uid.MultiFrameTrueColorSecondaryCaptureImageStorage,
)
SR_STORAGE: Final[tuple[str, ...]] = (
    uid.BasicTextSRStorage,
    uid.EnhancedSRStorage,
    uid.ComprehensiveSRStorage,
    uid.Comprehensive3DSRStorage,
    uid.XRayRadiationDoseSRStorage,
)
TRANSFER_SYNTAXES: Final[tuple[str, ...]] = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.RLELossless,
)
# What the listener sends its reports as: every PACS takes the uncompressed syntaxes.
# The Verification SOP Class (C-ECHO).
VERIFICATION: Final = "1.2.840.10008.1.1"
SR_SEND_SYNTAXES: Final[tuple[str, ...]] = (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian)


def is_image(sop_class_uid: str) -> bool:
    """Whether an instance can be part of what is screened (SRs travel along, never alone)."""
    return sop_class_uid in IMAGE_STORAGE
