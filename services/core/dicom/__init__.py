"""DICOM domain: intake of inputs, studies and series, series selection, geometry, volumes.

intake.collect_dicom_files -> instances/series.read_studies -> series.select_series ->
volume.load_volume (geometry.py holds the pure slice-geometry functions). Nothing here
knows about models or tensors; the hand-off to preprocessing is services.core.volume.Volume.
"""
