"""DICOM structured reports of screened studies (highdicom): the evidence a report needs of
its source study (evidence.py), the document (document.py) and its codes (codes.py)."""
