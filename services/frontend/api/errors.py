"""Every error of the REST API answers ``{"reason": "..."}`` with its status."""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from loguru import logger
from starlette.exceptions import HTTPException


def api_error(status: int, reason: str, headers: dict[str, str] | None = None) -> HTTPException:
    return HTTPException(status_code=status, detail=reason, headers=headers)


async def _http_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    return JSONResponse(
        {"reason": str(error.detail)}, status_code=error.status_code, headers=error.headers
    )


async def _invalid_request(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    problems = "; ".join(
        f"{'.'.join(str(part) for part in item.get('loc', ()))}: {item.get('msg', '')}"
        for item in error.errors()
    )
    return JSONResponse({"reason": f"invalid request: {problems}"}, status_code=422)


async def _unexpected(_request: Request, error: Exception) -> JSONResponse:
    logger.opt(exception=error).error("REST API error")
    return JSONResponse({"reason": f"internal error ({type(error).__name__})"}, status_code=500)


def install_error_handlers(api: FastAPI) -> None:
    api.add_exception_handler(HTTPException, _http_error)
    api.add_exception_handler(RequestValidationError, _invalid_request)
    api.add_exception_handler(Exception, _unexpected)
