"""The image each sample shows: the mid-axial slice and the coronal view of what the model saw,
side by side, or a card saying why there is no image.

A sample has one media file, so the two previews become one picture: both scaled to the same
height, axial on the left, coronal on the right. A study without previews (refused before the
model, or a row of an embeddings parquet) gets a card with its status and reason, so that it
still has a tile in the App's grid.
"""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from visualisation.records import StudyRecord

MEDIA_HEIGHT = 256  # pixels: the App's grid shows tiles of about this size
GAP = 8  # pixels between the axial and the coronal view
BACKGROUND = 0  # black, like the air around a patient
CARD_SIZE = (2 * MEDIA_HEIGHT + GAP, MEDIA_HEIGHT)
CARD_BACKGROUND = (48, 48, 48)
CARD_TEXT = (230, 230, 230)
# The grid shows a card at about a third of its size: large letters, few words.
CARD_FONT_SIZE = 34
CARD_LINE_CHARACTERS = 27
CARD_MAX_LINES = 5


def media_file_name(key: str) -> str:
    """A file name per sample key: a hash, since a key holds a UID or an input path."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:20] + ".png"


def _scaled_to_height(image: Image.Image, height: int) -> Image.Image:
    width = max(1, round(image.width * height / image.height))
    return image.convert("L").resize((width, height), Image.Resampling.BILINEAR)


def side_by_side(views: list[Image.Image], *, height: int = MEDIA_HEIGHT) -> Image.Image:
    """The views scaled to one height, left to right, ``GAP`` pixels apart."""
    scaled = [_scaled_to_height(view, height) for view in views]
    width = sum(view.width for view in scaled) + GAP * (len(scaled) - 1)
    canvas = Image.new("L", (width, height), BACKGROUND)
    left = 0
    for view in scaled:
        canvas.paste(view, (left, 0))
        left += view.width + GAP
    return canvas


def card_lines(record: StudyRecord) -> list[str]:
    """What a card says: no image, the status, the reason (never the input's name: file names
    may hold patient names)."""
    first = "embeddings file row" if record.origin == "embeddings" else "did not reach the model"
    lines = [record.status, first]
    if record.failure_reason:
        lines.extend(textwrap.wrap(record.failure_reason, CARD_LINE_CHARACTERS))
    if len(lines) > CARD_MAX_LINES:
        lines = [*lines[: CARD_MAX_LINES - 1], lines[CARD_MAX_LINES - 1][:-3] + "..."]
    # The default font draws ASCII only.
    return [line.encode("ascii", "replace").decode("ascii") for line in lines]


def card(lines: list[str]) -> Image.Image:
    canvas = Image.new("RGB", CARD_SIZE, CARD_BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=CARD_FONT_SIZE)
    top = 14
    for line in lines:
        draw.text((16, top), line, fill=CARD_TEXT, font=font)
        top += CARD_FONT_SIZE + 12
    return canvas


def sample_media(record: StudyRecord) -> Image.Image:
    views = []
    for path in (record.axial_preview, record.coronal_preview):
        if path is None:
            continue
        try:
            with Image.open(path) as image:
                views.append(image.copy())
        except OSError:
            continue  # a damaged preview: the card says what the study is
    return side_by_side(views) if views else card(card_lines(record))


def write_sample_media(record: StudyRecord, media_dir: Path) -> Path:
    media_dir = Path(media_dir)
    media_dir.mkdir(parents=True, exist_ok=True)
    path = media_dir / media_file_name(record.key)
    sample_media(record).save(path, format="PNG")
    return path
