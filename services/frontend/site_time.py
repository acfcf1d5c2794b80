"""Times as the site reads them: the registry keeps UTC, the page shows the site's time zone
(frontend.time_zone), to the second, since a triage shift compares minutes."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo


class SiteClock:
    def __init__(self, time_zone: str = "UTC") -> None:
        self.zone = ZoneInfo(time_zone)
        self.name = time_zone

    def now(self) -> datetime:
        return datetime.now(UTC)

    def local(self, moment: datetime) -> datetime:
        aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
        return aware.astimezone(self.zone)

    def short(self, moment: datetime) -> str:
        """Today's times as HH:MM:SS, older ones with their date."""
        local = self.local(moment)
        if local.date() == self.local(self.now()).date():
            return local.strftime("%H:%M:%S")
        return local.strftime("%Y-%m-%d %H:%M")

    def full(self, moment: datetime) -> str:
        return self.local(moment).strftime("%Y-%m-%d %H:%M:%S ") + self.name
