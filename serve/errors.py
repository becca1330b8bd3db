"""Errors in OpenAI's shape: ``{"error": {"message", "type", "code", "param"}}`` with a status.

Status codes (fixed by the interface): 400 bad request values (unknown adapter or router,
parameters out of range, prompt longer than the context), 401 missing or wrong API key, 404
unknown model id, 429 full queue (with ``Retry-After``), 503 shutting down.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

# status -> OpenAI error type
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """An error answered to the client as is (never carries secrets or file paths)."""

    def __init__(self, status: int, message: str, code: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "code": self.code, "param": self.param}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, code: str = "invalid_parameter", param: str | None = None) -> ApiError:
    return ApiError(400, message, code, param=param)
