"""Exceptions of the engine, in one place: an API error answer, and the ones that stop a whole run."""

from __future__ import annotations

from typing import Any

__all__ = [
    "APIStatusError",
    "AuthenticationError",
    "BillingError",
    "FatalAPIError",
    "OutputLost",
    "PermissionDeniedError",
    "RunStopped",
    "ServiceUnavailableError",
    "SpendLimitReachedError",
]


class RunStopped(Exception):
    """The run was asked to stop (Ctrl-C): nothing new is sent, finished requests are saved, and running
    the same command again resumes."""


class APIStatusError(Exception):
    """The API answered with an error status."""

    # Alike in shape only to other long signatures (positional, then defaulted arguments).
    def __init__(
        self,
        status: int,
        error_type: str,
        message: str,
        request_id: str | None = None,
        error_code: str | None = None,
    ) -> None:
        super().__init__(f"{status} {error_type}: {message}")
        self.status = status
        self.error_type = error_type
        self.message = message
        self.request_id = request_id
        #: `error.details.error_code`, e.g. enforced_spend_limit_reached or ramp_limit_exceeded.
        self.error_code = error_code

    @classmethod
    def from_body(cls, status: int, body: Any, request_id: str | None) -> APIStatusError:
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict):
            error = {}
        error_type = str(error.get("type") or f"http_{status}")
        message = str(error.get("message") or (body if isinstance(body, str) else ""))[:2000]
        details = error.get("details")
        error_code = details.get("error_code") if isinstance(details, dict) else None
        if status == 401:
            return AuthenticationError(status, error_type, message, request_id)
        if status == 402:
            return BillingError(status, error_type, message, request_id)
        if status == 403:
            return PermissionDeniedError(status, error_type, message, request_id)
        if status == 429 and error_code == "enforced_spend_limit_reached":
            return SpendLimitReachedError(status, error_type, message, request_id, error_code)
        return cls(status, error_type, message, request_id, error_code)


class FatalAPIError(APIStatusError):
    """An answer that no retry can fix and that every later request would get too: the run stops."""

    hint = ""

    def __str__(self) -> str:
        return f"{self.status} {self.error_type}: {self.message}. {self.hint}".strip()


class OutputLost(FatalAPIError):
    """This run no longer holds its output (another run took it over, or the hold could not be proven): it
    stops like a fatal answer stops it, sending nothing more and saving what is in flight."""

    def __str__(self) -> str:
        return self.message


class AuthenticationError(FatalAPIError):
    hint = "Check the API key (ANTHROPIC_API_KEY, --api-key or the credentials block)."


class BillingError(FatalAPIError):
    hint = "Add credit to the Anthropic account, then run again: finished requests are not re-sent."


class PermissionDeniedError(FatalAPIError):
    hint = "The API key lacks access to this model or resource."


class SpendLimitReachedError(FatalAPIError):
    hint = "The workspace spend limit is reached; raise it in the Console or wait for it to reset, then resume."


class ServiceUnavailableError(FatalAPIError):
    """Nothing of a limit class succeeded for `--give-up-after` seconds: the run gives up for now."""

    hint = "Run the same command later: it resumes, and nothing that succeeded is sent again."
