"""What the page's events do: each method of PageActions is one event of the page (app.py),
and each asks who is asking (the gate put the principal on the request)."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import gradio as gr
from loguru import logger
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from services.broker.schemas import Priority
from services.core.access import Permission, Principal, PrincipalKind
from services.frontend import study_access, views, worklist_rows
from services.frontend.api.models import ReviewRequest
from services.frontend.auth.access import OPEN_PRINCIPAL, AccessControl
from services.frontend.auth.gate import client_address, principal_of
from services.frontend.files import file_url
from services.frontend.queue_status import QueuePlace
from services.frontend.reviews import record_review
from services.frontend.service import FrontendService
from services.frontend.sessions import is_session_token, new_session_token
from services.frontend.site_time import SiteClock
from services.frontend.study_access import StudyRefused, may_see, sender_name, viewer_name
from services.frontend.study_models import StudyDocument
from services.frontend.study_view import study_view
from services.frontend.uploads import stored_bytes, upload_audit_detail
from services.registry import StudyRecord
from services.registry.audit import AuditAction


def signature(value: object) -> str:
    """A short fingerprint of what a component shows: redraw only when it changed."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


class NotSignedIn(Exception):
    """An event without a principal: the gate lets none through, so this is a bug."""


class PageActions:
    """What the page's events do, over one FrontendService; each method is one event, and
    each asks who is asking (the gate put the principal on the request)."""

    def __init__(self, service: FrontendService, access: AccessControl) -> None:
        self.service = service
        self.access = access
        self.clock = SiteClock(service.settings.frontend.time_zone)
        # Result files never change once written: cached per path.
        self.read_json = lru_cache(maxsize=256)(self._read_json)

    def _read_json(self, relative: str) -> dict[str, Any] | None:
        path = self.service.file_path(relative)
        if path is None:
            return None
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return document if isinstance(document, dict) else None

    def principal(self, request: gr.Request | None) -> Principal:
        if not self.access.sign_in_required:
            return OPEN_PRINCIPAL
        connection = getattr(request, "request", None)
        principal = principal_of(connection) if connection is not None else None
        if principal is None:
            raise NotSignedIn("an event without a signed-in user")
        return principal

    def client(self, request: gr.Request | None) -> str | None:
        connection = getattr(request, "request", None)
        return client_address(connection) if connection is not None else None

    def file_url(self, relative: str) -> str | None:
        return file_url(relative) if self.service.file_path(relative) is not None else None

    def records(self, principal: Principal, token: str | None) -> list[StudyRecord]:
        if principal.kind is PrincipalKind.OPEN and not is_session_token(token):
            return []
        return self.service.worklist_for(principal, token)

    def study_of(
        self,
        principal: Principal,
        records: list[StudyRecord],
        key: str | None,
        places: dict[str, QueuePlace],
    ) -> StudyDocument | None:
        parsed = views.parse_row_key(key)
        if parsed is None:
            return None
        task_id, index = parsed
        siblings = [record for record in records if record.task_id == task_id]
        if not siblings:  # not on the list (hidden, older): a patient's other study, say
            siblings = [
                study_access.shown(record, principal)
                for record in self.service.registry.task_studies(task_id)
                if may_see(principal, record)
            ]
        record = next((r for r in siblings if r.report_index == index), None)
        if record is None:
            return None
        identity = record.identity
        patient = (
            [
                study_access.shown(other, principal)
                for other in self.service.registry.patient_studies(
                    identity.patient_id, identity.issuer_of_patient_id
                )
                if may_see(principal, other)
            ]
            if identity is not None and identity.patient_id
            else []
        )
        files = principal.may(Permission.SEE_IDENTITY)  # admin: the row, not the files
        reviews = self.service.registry.reviews(task_id, index) if record.state.final else []
        return study_view(
            record,
            self.service.result(task_id) if record.state.final and files else None,
            n_studies=len(siblings),
            place=places.get(task_id),
            patient_studies=patient,
            file_url=self.file_url,
            read_json=self.read_json,
            clock=self.clock,
            reviews=reviews,
            may_review=principal.may(Permission.REVIEW),
        )

    def ensure_session(self, token: str | None, request: gr.Request) -> tuple[Any, ...]:
        principal = self.principal(request)
        token = token if is_session_token(token) else new_session_token()
        self.access.audit(principal, AuditAction.LIST, self.client(request), detail="worklist")
        return token, views.user_bar(principal, sign_in=self.access.sign_in_required)

    def submit(
        self, token: str | None, files: list[str] | None, stat: bool | None, request: gr.Request
    ) -> tuple[Any, ...]:
        """The files picked or dropped, sent at once; STAT goes ahead of the routine queue
        (the box is cleared afterwards: the next upload is routine unless ticked again)."""
        principal = self.principal(request)
        if not principal.may(Permission.UPLOAD):
            return "Your role does not send studies.", gr.skip(), gr.skip(), gr.skip()
        if not is_session_token(token):
            return (
                "The page is still starting; please try again in a second.",
                gr.skip(),
                gr.skip(),
                gr.skip(),
            )
        priority = Priority.STAT if stat else Priority.ROUTINE
        outcome = self.service.submit_uploads(
            viewer_name(principal, token),
            sender_name(principal),
            [Path(path) for path in files or []],
            priority=priority,
            principal=principal,
        )
        for record in outcome.submitted:
            self.access.audit(
                principal,
                AuditAction.UPLOAD,
                self.client(request),
                task_id=record.task_id,
                detail=upload_audit_detail(
                    "page",
                    priority.value,
                    stored_bytes(self.service.storage_root / record.study_path),
                ),
            )
        # The guide makes room for the worklist once something is taken.
        taken = outcome.submitted or outcome.screened_before or outcome.screened_elsewhere
        message = ("STAT: " if stat and outcome.submitted else "") + outcome.message
        return (
            views.markdown_text(message),
            None,
            gr.update(open=False) if taken else gr.skip(),
            False,
        )

    def refresh(
        self,
        token: str | None,
        key: str | None,
        shown: dict[str, str] | None,
        request: gr.Request,
    ) -> tuple[Any, ...]:
        principal = self.principal(request)
        shown = dict(shown or {})
        try:
            records = self.records(principal, token)
            places = self.service.queue_places()
            study = self.study_of(principal, records, key, places)
        except SQLAlchemyError as error:
            # The registry's database is away (restarting): the page keeps what it shows.
            logger.warning("worklist not refreshed: {}", type(error).__name__)
            return (gr.skip(),) * 4 + (shown,)
        finished = any(record.state.final for record in records)
        drawn = {
            "worklist": worklist_rows.worklist(records, places, clock=self.clock).model_dump(
                mode="json"
            ),
            "study": study,
            "xlsx": finished and principal.may(Permission.SEE_IDENTITY),
        }
        redraw = {name for name, value in drawn.items() if changed(shown, name, value)}
        updates = {name: value if name in redraw else gr.skip() for name, value in drawn.items()}
        download = gr.skip()
        if "xlsx" in redraw:
            browser = token if principal.kind is PrincipalKind.OPEN else None
            download = views.download_all_link(bool(drawn["xlsx"]), browser)
        return (
            gr.update(visible=self.service.demo_weights_in_use(records)),
            updates["worklist"],
            updates["study"],
            download,
            shown,
        )

    def open_study(
        self,
        token: str | None,
        shown: dict[str, str] | None,
        event: gr.EventData,
        request: gr.Request,
    ) -> Any:
        principal = self.principal(request)
        key = event_key(event)
        study = self.study_of(
            principal, self.records(principal, token), key, self.service.queue_places()
        )
        parsed = views.parse_row_key(key)
        if study is not None and parsed is not None:
            self.access.audit(
                principal,
                AuditAction.VIEW_STUDY,
                self.client(request),
                task_id=parsed[0],
                study_instance_uid=self._study_uid(*parsed),
            )
        shown = {**(shown or {}), "study": signature(study)}
        return (key if study else None), study, shown

    def review(
        self,
        token: str | None,
        key: str | None,
        shown: dict[str, str] | None,
        event: gr.EventData,
        request: gr.Request,
    ) -> Any:
        """A radiologist's review from the study view (services/frontend/reviews.py checks,
        keeps and audits it, as for the REST API); the page redrawn."""
        principal = self.principal(request)
        data = event._data if isinstance(event._data, dict) else {}
        parsed = views.parse_row_key(data.get("key"))
        if parsed is None:
            raise gr.Error("No study to review.")
        try:
            wanted = ReviewRequest(
                report_index=parsed[1],
                agrees=data.get("agrees"),
                pathology=data.get("pathology"),
                findings=data.get("findings") or {},
                comment=str(data.get("comment") or ""),
            )
            record_review(self.access, principal, self.client(request), parsed[0], wanted)
        except ValidationError as error:
            raise gr.Error(f"The review was not recorded: {error.errors()[0]['msg']}") from None
        except StudyRefused as refusal:
            raise gr.Error(f"The review was not recorded: {refusal.reason}") from None
        return self.refresh(token, key, {**(shown or {}), "worklist": "", "study": ""}, request)

    def _study_uid(self, task_id: str, index: int) -> str | None:
        record = self.service.registry.study(task_id, index)
        return record.study_instance_uid if record is not None else None

    def remove_study(
        self,
        token: str | None,
        key: str | None,
        shown: dict[str, str] | None,
        event: gr.EventData,
        request: gr.Request,
    ) -> Any:
        principal = self.principal(request)
        removed = views.parse_row_key(event_key(event))
        if (
            removed is not None
            and (is_session_token(token) or principal.kind is not PrincipalKind.OPEN)
            and self.service.hide(viewer_name(principal, token), *removed)
        ):
            self.access.audit(principal, AuditAction.HIDE, self.client(request), task_id=removed[0])
        selected = views.parse_row_key(key)
        if selected is not None and removed is not None and selected == removed:
            key = None
        return (key, *self.refresh(token, key, {**(shown or {}), "worklist": ""}, request))


def changed(shown: dict[str, str], name: str, value: object) -> bool:
    """Whether ``value`` differs from what the page shows; notes its fingerprint in ``shown``."""
    fingerprint = signature(value)
    previous = shown.get(name)
    shown[name] = fingerprint
    return previous != fingerprint


def event_key(event: gr.EventData) -> str | None:
    """The row key a worklist event carries."""
    data = event._data
    key = data.get("key") if isinstance(data, dict) else None
    return key if isinstance(key, str) else None
