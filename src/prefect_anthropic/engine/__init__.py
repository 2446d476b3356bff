"""The engine: plain asyncio + httpx, no Prefect. Requests in, result records out, at the rate limits."""

from .client import DEFAULT_BASE_URL, AnthropicClient, ClientStats
from .errors import (
    APIStatusError,
    AuthenticationError,
    BillingError,
    FatalAPIError,
    PermissionDeniedError,
    RunStopped,
    SpendLimitReachedError,
)
from .estimator import InputTokenEstimator, OutputTokenEstimator
from .limiter import RateLimiter, RateLimits, TokenBucket
from .records import RequestItem, ResultRecord
from .results_file import LineSet, ResultsWriter, read_records, succeeded_lines, succeeded_requests
from .retry import RetryPolicy
from .runner import Progress, run_requests

__all__ = [
    "DEFAULT_BASE_URL",
    "APIStatusError",
    "AnthropicClient",
    "AuthenticationError",
    "BillingError",
    "ClientStats",
    "FatalAPIError",
    "InputTokenEstimator",
    "LineSet",
    "OutputTokenEstimator",
    "PermissionDeniedError",
    "Progress",
    "RateLimiter",
    "RateLimits",
    "RequestItem",
    "ResultRecord",
    "ResultsWriter",
    "RetryPolicy",
    "RunStopped",
    "SpendLimitReachedError",
    "TokenBucket",
    "read_records",
    "run_requests",
    "succeeded_lines",
    "succeeded_requests",
]
