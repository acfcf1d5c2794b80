"""The REST API for integrators who speak neither DICOM nor AMQP: ``/api/v1`` on the
frontend's server (a FastAPI application mounted next to the Gradio page).

    POST /api/v1/studies                       multipart ``file`` (zip, tar, NIfTI, DICOM)
                                               -> 202 {"task_id", "status_url"}
    GET  /api/v1/studies/{task_id}             state, progress; the reports when done
    GET  /api/v1/studies/{task_id}/files/{kind}?index=1   xlsx | json | sr | warnings
    GET  /api/v1/openapi.json                  this API's OpenAPI schema (docs at /api/v1/docs)

Uploads pass the web UI's checks (services/frontend/uploads.py) and queue limit, through the
same FrontendService; an upload is not compared with earlier ones (a resubmission is a new
task). With ``frontend.api_token`` set, every call but the schema needs
``Authorization: Bearer <token>``. Every error is JSON: ``{"reason": "..."}``.

The rooms: ``models.py`` (what goes over the wire), ``dependencies.py`` (who may ask, which
task), ``studies.py`` (the routes), ``errors.py`` (every error as ``{"reason"}``).
"""

from services.frontend.api.app import API_PREFIX, build_rest_api

__all__ = ["API_PREFIX", "build_rest_api"]
