"""DICOM domain: headers into studies and series, series selection, geometry, volumes.

headers.read_studies -> series_selection.select_series -> volume_builder.load_volume
(pixel_data.py decodes the slices, geometry.py holds the pure slice-geometry functions,
values.py reads tag values safely). Nothing here knows about models or tensors; the
hand-off to preprocessing is services.core.volume.Volume.
"""

from services.core.dicom.headers import HEADER_KEYWORDS, read_studies
from services.core.dicom.objects import Instance, Series, Study
from services.core.dicom.series_selection import SeriesSelection, kernel_kind, select_series
from services.core.dicom.volume_builder import load_volume

__all__ = [
    "HEADER_KEYWORDS",
    "Instance",
    "Series",
    "SeriesSelection",
    "Study",
    "kernel_kind",
    "load_volume",
    "read_studies",
    "select_series",
]
