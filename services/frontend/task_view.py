"""The outcome of an upload: what was queued, refused or found screened before (plain data;
service.py fills it, the page shows its message)."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.registry.records import StudyRecord


@dataclass
class SubmitOutcome:
    submitted: list[StudyRecord] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # one line per refused file, with the reason
    # (the file's name, the earlier task's row): the same bytes were screened before.
    screened_before: list[tuple[str, StudyRecord]] = field(default_factory=list)
    # The file's name: the same bytes were screened before, as a study the viewer may not
    # open (sent by someone else); the message names neither who nor when.
    screened_elsewhere: list[str] = field(default_factory=list)

    @property
    def message(self) -> str:
        lines = []
        if self.submitted:
            names = ", ".join(record.original_filename for record in self.submitted)
            count = len(self.submitted)
            lines.append(f"Queued {count} stud{'y' if count == 1 else 'ies'}: {names}")
        lines.extend(
            f"{name}: already screened (the same file, received "
            f"{earlier.received_at:%Y-%m-%d %H:%M} UTC): its row is shown, not recomputed"
            for name, earlier in self.screened_before
        )
        lines.extend(
            f"{name}: already screened (the same file was sent before by someone else), so it "
            "is not screened again and its result is not on your list; a radiologist can open "
            "it, please ask one"
            for name in self.screened_elsewhere
        )
        lines.extend(self.refused)
        return (
            "\n\n".join(lines) or "Nothing to submit: choose .zip, .tar, .nii or .dcm files first."
        )
