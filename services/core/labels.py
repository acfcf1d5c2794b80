"""The findings in model output order and their severity order (docs/ARCHITECTURE.md,
Contracts). The one place they are written: every count of findings is len(FINDING_LABELS).

A finding is only ever appended (docs/ARCHITECTURE.md, "Where a change goes"): its index is the
output index of the deployed heads, and trained heads and stored reports refer to it."""

from __future__ import annotations

# Index order of the multilabel head's output: the 18 CT-RATE findings, then two MosMed ones.
FINDING_LABELS: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
    "COVID-19",
    "Cancer",
)

# Most dangerous first.
SEVERITY_ORDER: tuple[str, ...] = (
    "Cancer",
    "COVID-19",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Pericardial effusion",
    "Cardiomegaly",
    "Consolidation",
    "Emphysema",
    "Bronchiectasis",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Mosaic attenuation pattern",
    "Interlobular septal thickening",
    "Peribronchial thickening",
    "Lymphadenopathy",
    "Arterial wall calcification",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Medical material",
)

assert sorted(FINDING_LABELS) == sorted(SEVERITY_ORDER), "labels and severity order disagree"
