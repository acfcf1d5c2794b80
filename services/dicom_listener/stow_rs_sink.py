"""The DICOMweb destination: one STOW-RS request per report (dicomweb-client over requests).

How an answer is read (PS3.18 10.5.3), for the one instance each request carries:

* 200 (and any other 2xx): stored, unless the response's FailedSOPSequence lists the
  instance; Orthanc's DICOMweb plugin, for one, answers 200 with a FailedSOPSequence
  when it could not store an instance. Warning reasons of the instance's
  ReferencedSOPSequence item go into the status text ("HTTP 202, warning 0xB007").
* 202: the same reading: stored with warnings, or refused by its FailedSOPSequence.
* 408, 429, 5xx, a connection error or a timeout: unavailable; the sender tries again
  with backoff. (A read timeout after the server stored the instance only makes the same
  instance arrive twice: its UIDs are derived from the task, so the archive keeps one.)
* any other 4xx (400, 401, 403, 404, 409, 413, 415 ...): refused; the report is set aside
  in failed/ with the status, for the administrator.
* 3xx: refused. Redirects are not followed: requests would repeat a POST as a GET, and
  the answer of that GET would read as stored. The configured URL must be the final one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from services.core.config import HttpCredentials, StowRsDestination
from services.core.errors import ConfigurationError
from services.dicom_listener.report_sink import DestinationRefused, DestinationUnavailable

RETRY_LATER_CLIENT_STATUSES = frozenset({408, 429})  # Request Timeout, Too Many Requests
DICOM_JSON_TYPES = ("application/dicom+json", "application/json")
# What pydicom raises on a JSON body that is not a DICOM data set (an error page, a list).
BODY_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError, AttributeError, KeyError)


class MissingSecret(ConfigurationError):
    """The credentials of a STOW-RS destination name a secret that is not there."""


@dataclass(frozen=True)
class StowAnswer:
    """What a STOW-RS response says about the one instance that was sent."""

    http_status: int
    failure_reasons: tuple[int | None, ...] = ()  # its FailedSOPSequence items (None: no reason)
    warning_reasons: tuple[int, ...] = ()  # WarningReason of its ReferencedSOPSequence item


def _int_or_none(value: object) -> int | None:
    return None if value is None or value == "" else int(str(value))


def _items_for(body: Dataset, keyword: str, sop_instance_uid: str) -> list[Dataset]:
    """Items of ``keyword`` that name the instance (or name none: one instance was sent)."""
    return [
        item
        for item in body.get(keyword, None) or []
        if str(item.get("ReferencedSOPInstanceUID", sop_instance_uid)) == sop_instance_uid
    ]


def read_stow_answer(
    http_status: int, content_type: str, body: bytes, sop_instance_uid: str
) -> StowAnswer:
    """The parts of a STOW-RS response that decide the outcome. A body that is not DICOM
    JSON (an error page, nothing at all) leaves the status code to decide."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if not body.strip() or media_type not in DICOM_JSON_TYPES:
        return StowAnswer(http_status)
    try:
        dataset = Dataset.from_json(body.decode("utf-8"))
        failures = tuple(
            _int_or_none(item.get("FailureReason", None))
            for item in _items_for(dataset, "FailedSOPSequence", sop_instance_uid)
        )
        warnings = tuple(
            reason
            for item in _items_for(dataset, "ReferencedSOPSequence", sop_instance_uid)
            if (reason := _int_or_none(item.get("WarningReason", None))) is not None
        )
    except BODY_ERRORS:
        return StowAnswer(http_status)
    return StowAnswer(http_status, failures, warnings)


def _reasons(label: str, reasons: tuple[int | None, ...]) -> str:
    words = ["not given" if reason is None else f"0x{reason:04X}" for reason in reasons]
    return f", {label} {' '.join(words)}" if words else ""


def stow_outcome(answer: StowAnswer, where: str) -> str:
    """The status text of a stored instance; raises DestinationUnavailable (retry later) or
    DestinationRefused (set aside) otherwise. ``where`` names the destination in messages."""
    status = answer.http_status
    text = f"HTTP {status}{_reasons('failure reason', answer.failure_reasons)}"
    if status in RETRY_LATER_CLIENT_STATUSES or status >= 500:
        raise DestinationUnavailable(f"{where}: {text}")
    if 300 <= status < 400:
        raise DestinationRefused(f"{where}: {text} (a redirect: configure the URL it points to)")
    if status >= 400 or answer.failure_reasons:
        raise DestinationRefused(f"{where}: {text}")
    if status < 200:  # no final answer (requests never returns a 1xx one)
        raise DestinationUnavailable(f"{where}: {text}")
    return text + _reasons("warning", answer.warning_reasons)


def read_secret(credentials: HttpCredentials, environ: Mapping[str, str]) -> str:
    """The token or password the credentials point to; MissingSecret when it is not there."""
    if credentials.secret_env is not None:
        where = f"environment variable {credentials.secret_env}"
        secret = environ.get(credentials.secret_env, "").strip()
    else:
        assert credentials.secret_file is not None  # the model requires one of the two
        where = f"secret file {credentials.secret_file}"
        try:
            secret = credentials.secret_file.read_text().strip()
        except OSError as error:
            raise MissingSecret(f"{where}: {type(error).__name__}") from error
    if not secret:
        raise MissingSecret(f"{where} is empty or not set")
    return secret


class StowRsSink:
    """Sends reports to a DICOMweb server by STOW-RS.

    The secret is read when the sink is made (a missing one stops the listener with the
    reason) and again for every report, so a rotated token is picked up without a restart;
    one that disappears later keeps the reports waiting, as an unreachable server would.
    """

    def __init__(
        self, destination: StowRsDestination, *, environ: Mapping[str, str] | None = None
    ) -> None:
        self.destination = destination
        self.environ = os.environ if environ is None else environ
        self._authentication()

    def describe(self) -> str:
        return f"{self.destination.url} (STOW-RS)"

    def _authentication(self) -> tuple[dict[str, str], tuple[str, str] | None]:
        """Headers and basic-auth pair for one request."""
        credentials = self.destination.credentials
        if credentials is None:
            return {}, None
        secret = read_secret(credentials, self.environ)
        if credentials.scheme == "bearer":
            return {"Authorization": f"Bearer {secret}"}, None
        assert credentials.username is not None  # the model requires it for basic
        return {}, (credentials.username, secret)

    def _session(self) -> requests.Session:
        destination = self.destination
        session = requests.Session()
        session.verify = (
            str(destination.tls_ca_bundle)
            if destination.tls_ca_bundle is not None
            else destination.tls_verify
        )
        session.max_redirects = 0  # see the module's docstring: 3xx is refused, not followed
        return session

    def send(self, document: Dataset) -> str:
        try:
            headers, basic = self._authentication()
        except MissingSecret as error:
            raise DestinationUnavailable(f"{self.describe()}: {error}") from error
        responses: list[requests.Response] = []

        def keep(response: requests.Response, *_args: Any, **_kwargs: Any) -> None:
            responses.append(response)

        with self._session() as session:
            session.auth = basic
            client = DICOMwebClient(
                self.destination.url,
                session=session,
                headers={"Accept": "application/dicom+json", **headers},
                timeout=self.destination.timeout_s,
                callback=keep,
            )
            # One backoff for every destination: the sender's (services/core/retry.py).
            client.set_http_retry_params(retry=False)
            try:
                client.store_instances([document])
            except (requests.HTTPError, requests.TooManyRedirects):
                pass  # a 3xx, 4xx or 5xx: its response below decides
            except BODY_ERRORS as error:
                if not responses:  # before any request: the document itself did not encode
                    raise DestinationRefused(
                        f"{self.describe()}: not encoded ({type(error).__name__})"
                    ) from error
                # Otherwise the client could not parse the body; the response below decides.
            except requests.RequestException as error:  # no connection, a timeout, a cut answer
                raise DestinationUnavailable(
                    f"{self.describe()}: {type(error).__name__}"
                ) from error
        if not responses:
            raise DestinationUnavailable(f"{self.describe()}: no answer")
        response = responses[-1]
        answer = read_stow_answer(
            response.status_code,
            response.headers.get("Content-Type", ""),
            response.content,
            str(document.SOPInstanceUID),
        )
        return stow_outcome(answer, self.describe())
