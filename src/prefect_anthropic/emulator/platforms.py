"""The clouds' surfaces, beside api.anthropic.com's: Amazon Bedrock's InvokeModel and Google Vertex AI's rawPredict.

Each turns its request into the first-party one the emulator answers (the model from the path, the platform's
body fields out), checks the platform's own auth (SigV4 against the emulator's test key pair, recomputed with
botocore's signer; a bearer token), and answers in the platform's shape: the Message as it is, with no
`anthropic-ratelimit-*` headers and no `retry-after` (neither platform sends them), and errors as the platform
words them (Bedrock: `{"message"}` and `x-amzn-errortype`; Vertex: Google's `{"error": {"code", "message",
"status"}}`). The body rules are the installed `anthropic` SDK's (`lib/bedrock/_client.py`,
`lib/vertex/_client.py`): it sends `anthropic_version` in the body, Bedrock `anthropic_beta` as a body list.
"""

from __future__ import annotations

import base64
import hmac
import re
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import orjson

from ..api.request_rules import API_VERSIONS
from .errors import APIError
from .service import Caller

__all__ = [
    "AWS_SERVICE",
    "TEST_AWS_ACCESS_KEY",
    "TEST_AWS_SECRET_KEY",
    "PlatformRequest",
    "bedrock_error",
    "bedrock_request",
    "bedrock_stream_frame",
    "event_stream_frame",
    "vertex_error",
    "vertex_request",
    "without_limit_headers",
]

#: The SigV4 service name of Claude Platform on AWS (Bedrock's is `bedrock`).
AWS_SERVICE = "aws-external-anthropic"
#: The key pair whose SigV4 signatures the emulator accepts (a test pair: it reaches nothing but the emulator).
TEST_AWS_ACCESS_KEY = "AKIAEMULATOR00000000"
TEST_AWS_SECRET_KEY = "emulator+test+secret+for+sigv4+0000000000"

_SIGV4 = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/(?P<service>[^/]+)/aws4_request,"
    r"\s*SignedHeaders=(?P<headers>[^,]+),\s*Signature=(?P<signature>[0-9a-f]{64})"
)
_BEDROCK_ERROR_TYPES = {
    400: "ValidationException",
    401: "AccessDeniedException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    413: "ValidationException",
    429: "ThrottlingException",
    500: "InternalServerException",
    503: "ServiceUnavailableException",
    529: "ServiceUnavailableException",
}
_GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    529: "UNAVAILABLE",
}


@dataclass(frozen=True)
class PlatformRequest:
    """A platform's request as the first-party API would have received it."""

    caller: Caller
    body: dict[str, Any]
    stream: bool


def _first_party_body(body: Any, model: str, beta_field: str | None) -> tuple[dict[str, Any], str, str]:
    """The body without the platform's fields, with the path's model; its API version and betas."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    body = dict(body)
    version = body.pop("anthropic_version", None)
    if version not in API_VERSIONS:
        raise APIError(400, f"anthropic_version: {version!r} is not a valid version; use one of {API_VERSIONS}")
    betas = body.pop(beta_field, None) if beta_field is not None else None
    if "model" in body:
        raise APIError(400, "model: Extra inputs are not permitted (the model is in the path)")
    body["model"] = model
    return body, str(version), ",".join(betas) if isinstance(betas, list) else ""


def verify_sigv4(
    method: str, url: str, headers: Mapping[str, str], body: bytes, *, service: str, secrets: Mapping[str, str]
) -> str:
    """The access key whose secret signed the request (SigV4, as botocore signs it); APIError 403 otherwise."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    found = _SIGV4.fullmatch(headers.get("authorization", "").strip())
    if found is None:
        raise APIError(403, "Missing Authentication Token")
    access_key = found["key"]
    secret = secrets.get(access_key)
    if secret is None or found["service"] != service:
        raise APIError(403, "The security token included in the request is invalid.")
    signed = found["headers"].split(";")
    request = AWSRequest(method=method, url=url, data=body, headers={n: headers[n] for n in signed if n in headers})
    request.context["timestamp"] = headers.get("x-amz-date", "")
    signer = SigV4Auth(Credentials(access_key, secret, headers.get("x-amz-security-token")), service, found["region"])
    expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
    if not hmac.compare_digest(expected, found["signature"]):
        raise APIError(
            403,
            "The request signature we calculated does not match the signature you provided. Check your AWS Secret "
            "Access Key and signing method.",
        )
    return access_key


def bedrock_request(
    method: str, url: str, path_model: str, action: str, headers: Mapping[str, str], raw: bytes, body: Any
) -> PlatformRequest:
    """`POST /model/{model}/invoke` (or `/invoke-with-response-stream`), SigV4-signed for `bedrock` or with a
    bearer key (`AWS_BEARER_TOKEN_BEDROCK`)."""
    if action not in ("invoke", "invoke-with-response-stream"):
        raise APIError(404, f"unknown operation {action!r}")
    authorization = headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        key = authorization[7:].strip()
    else:
        secrets = {TEST_AWS_ACCESS_KEY: TEST_AWS_SECRET_KEY}
        key = verify_sigv4(method, url, headers, raw, service="bedrock", secrets=secrets)
    first_party, version, betas = _first_party_body(body, unquote(path_model), "anthropic_beta")
    first_party.pop("stream", None)
    stream = action == "invoke-with-response-stream"
    if stream:
        first_party["stream"] = True
    return PlatformRequest(Caller(key, version, betas or headers.get("anthropic-beta", "")), first_party, stream)


def vertex_request(path_model: str, action: str, headers: Mapping[str, str], body: Any) -> PlatformRequest:
    """`POST .../publishers/anthropic/models/{model}:rawPredict` (`:streamRawPredict` streams), with an OAuth
    bearer token."""
    if action not in ("rawPredict", "streamRawPredict"):
        raise APIError(404, f"unknown method {action!r}")
    authorization = headers.get("authorization", "")
    if not authorization.lower().startswith("bearer ") or not authorization[7:].strip():
        raise APIError(401, "Request is missing required authentication credential. Expected OAuth 2 access token.")
    first_party, version, _ = _first_party_body(body, path_model, None)
    stream = bool(first_party.get("stream")) or action == "streamRawPredict"
    if stream:
        first_party["stream"] = True
    return PlatformRequest(
        Caller(authorization[7:].strip(), version, headers.get("anthropic-beta", "")), first_party, stream
    )


#: Bedrock's exception frames by the first-party error type of an `error` event.
_STREAM_EXCEPTIONS = {
    "overloaded_error": "serviceUnavailableException",
    "rate_limit_error": "throttlingException",
    "api_error": "internalServerException",
    "invalid_request_error": "validationException",
}


def event_stream_frame(headers: Mapping[str, str], payload: bytes) -> bytes:
    """One message of the AWS event-stream encoding (botocore's `EventStreamBuffer` reads it): a prelude of
    total and headers length with its CRC32, string headers, the payload, and the whole message's CRC32."""
    encoded = b"".join(
        bytes([len(name)]) + name.encode() + b"\x07" + struct.pack(">H", len(value)) + value.encode()
        for name, value in headers.items()
    )
    prelude = struct.pack(">II", 12 + len(encoded) + len(payload) + 4, len(encoded))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + encoded + payload
    return message + struct.pack(">I", zlib.crc32(message))


def bedrock_stream_frame(event: bytes) -> bytes:
    """A server-sent event of the first-party stream as Bedrock's `invoke-with-response-stream` sends it: a
    `chunk` whose payload carries the event's JSON base64-encoded; an `error` event as an exception frame."""
    data = next(line[6:] for line in event.split(b"\n") if line.startswith(b"data: "))
    parsed = orjson.loads(data)
    if parsed.get("type") == "error":
        error = parsed.get("error") or {}
        kind = _STREAM_EXCEPTIONS.get(str(error.get("type")), "internalServerException")
        headers = {":message-type": "exception", ":exception-type": kind, ":content-type": "application/json"}
        return event_stream_frame(headers, orjson.dumps({"message": error.get("message", "")}))
    payload = orjson.dumps({"bytes": base64.b64encode(data).decode()})
    headers = {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"}
    return event_stream_frame(headers, payload)


def without_limit_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """What the platforms send of the emulator's headers: no rate-limit headers, no retry-after."""
    return {
        name: value
        for name, value in headers.items()
        if not name.lower().startswith("anthropic-ratelimit-") and name.lower() not in ("retry-after", "retry-after-ms")
    }


def bedrock_error(error: APIError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Bedrock's words for an error: (status, body, headers). Its throttling says neither which quota nor when."""
    status = 503 if error.status == 529 else error.status
    kind = _BEDROCK_ERROR_TYPES.get(error.status, "InternalServerException")
    message = "Too many requests, please wait before trying again." if error.status == 429 else error.message
    return (
        status,
        {"message": message},
        {"x-amzn-errortype": f"{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/"},
    )


def vertex_error(error: APIError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Vertex AI's words for an error (Google's envelope): (status, body, headers)."""
    status = 503 if error.status == 529 else error.status
    code = _GOOGLE_STATUS.get(error.status, "INTERNAL")
    message = (
        "Quota exceeded for aiplatform.googleapis.com/online_prediction_requests_per_base_model with base model: "
        "anthropic-claude. Please submit a quota increase request."
        if error.status == 429
        else error.message
    )
    return status, {"error": {"code": status, "message": message, "status": code}}, {}
