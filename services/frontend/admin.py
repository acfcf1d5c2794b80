"""The administrator's page of the audit trail: ``/admin/audit`` with the filters of
``python -m services.registry audit`` (since, actor, study), the newest rows first, and the
same rows as CSV or JSON Lines. Only a role with the AUDIT permission reaches it; every
value is shown as text.
"""

from __future__ import annotations

import html
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, Response

from services.core.access import Permission
from services.frontend.auth.access import AccessControl
from services.frontend.auth.gate import principal_of
from services.registry.audit import EXPORT_FIELDS, AuditQuery, as_csv, as_jsonl, export_row

PAGE_ROWS = 500
STYLE = """
body { font-family: system-ui, sans-serif; margin: 16px 24px; color: #263238; }
h1 { font-size: 20px; margin: 0 0 8px; } form { margin: 8px 0 12px; display: flex; gap: 8px;
align-items: end; flex-wrap: wrap; } label { font-size: 12px; font-weight: 600; display: grid; }
input { padding: 4px 6px; } table { border-collapse: collapse; font-size: 13px; width: 100%; }
th, td { border-bottom: 1px solid #eceff1; padding: 3px 6px; text-align: left;
white-space: nowrap; } th { position: sticky; top: 0; background: #fafafa; }
.note { color: #546e7a; font-size: 12px; }
"""


def _instant(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise HTTPException(422, "since: an ISO 8601 date or time, e.g. 2026-12-01") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def build_admin_router(access: AccessControl) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/admin/audit")
    def audit_page(
        request: Request,
        since: Annotated[str | None, Query(max_length=40)] = None,
        actor: Annotated[str | None, Query(max_length=128)] = None,
        study: Annotated[str | None, Query(max_length=64)] = None,
        format: Annotated[str, Query(pattern="^(html|csv|jsonl)$")] = "html",
    ) -> Response:
        principal = principal_of(request)
        if principal is None or not principal.may(Permission.AUDIT):
            raise HTTPException(403, "the audit trail is for administrators")
        exported = format != "html"
        query = AuditQuery(
            since=_instant(since),
            actor=actor or None,
            task_id=study or None,
            newest_first=not exported,
            limit=10_000_000 if exported else PAGE_ROWS,
        )
        entries = access.registry.audit.events(query)
        if format == "csv":
            return PlainTextResponse(
                as_csv(entries),
                media_type="text/csv",
                headers={"content-disposition": 'attachment; filename="audit.csv"'},
            )
        if format == "jsonl":
            return PlainTextResponse(
                as_jsonl(entries),
                media_type="application/jsonl",
                headers={"content-disposition": 'attachment; filename="audit.jsonl"'},
            )
        rows = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(value or ''))}</td>" for value in row) + "</tr>"
            for row in (export_row(entry).values() for entry in entries)
        )
        head = "".join(f"<th>{html.escape(name)}</th>" for name in EXPORT_FIELDS)

        def field(name: str, label: str, value: str | None) -> str:
            shown = html.escape(value or "", quote=True)
            return f'<label>{label}<input name="{name}" value="{shown}"></label>'

        filters = (
            field("since", "Since (ISO 8601)", since)
            + field("actor", "Actor", actor)
            + field("study", "Task id", study)
        )
        links = "".join(
            f' <a href="?{html.escape(request.url.query + "&" if request.url.query else "")}'
            f'format={kind}">{kind.upper()}</a>'
            for kind in ("csv", "jsonl")
        )
        page = (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f"<title>Audit trail · Chest CT screening</title><style>{STYLE}</style></head><body>"
            '<h1>Audit trail</h1><p class="note"><a href="../">Worklist</a> · newest first, '
            f"at most {PAGE_ROWS} rows here; every matching row in{links}</p>"
            f'<form method="get">{filters}<button type="submit">Filter</button></form>'
            f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></body></html>"
        )
        return HTMLResponse(page, headers={"cache-control": "no-store"})

    return router
