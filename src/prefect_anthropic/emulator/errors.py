"""The API's error envelope, as the emulator sends it."""

from __future__ import annotations

from typing import Any

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    # Not an answer of the API's own: a full gateway in front of it (--capacity-status 503).
    503: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


class APIError(Exception):
    """An error answer: HTTP status, error type and message, plus optional details and headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = ERROR_TYPES[status]
        self.message = message
        self.details = details
        self.headers = headers or {}

    def error_object(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.details:
            error["details"] = self.details
        return error

    def envelope(self, request_id: str) -> dict[str, Any]:
        return {"type": "error", "error": self.error_object(), "request_id": request_id}


def invalid(message: str) -> APIError:
    return APIError(400, message)
