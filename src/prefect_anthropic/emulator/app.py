"""The emulator's HTTP face: a Starlette app that speaks the Anthropic API on top of EmulatedAnthropic."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

from .batches import BatchStore
from .config import EmulatorConfig
from .errors import APIError
from .platforms import (
    AWS_SERVICE,
    TEST_AWS_ACCESS_KEY,
    TEST_AWS_SECRET_KEY,
    bedrock_error,
    bedrock_request,
    bedrock_stream_frame,
    verify_sigv4,
    vertex_error,
    vertex_request,
    without_limit_headers,
)
from .service import Caller, Completion, EmulatedAnthropic, new_id
from .sse import error_event, paced_stream


class StreamPacing:
    """How often paced streams write: each write carries the events due by then, none early. Every
    MIN_TICK_S at most; with many streams at once less often, so that together they write about
    WRITES_PER_SECOND times a second (one sleep per write) and thousands in flight stay cheap."""

    MIN_TICK_S = 0.05
    WRITES_PER_SECOND = 5_000

    def __init__(self) -> None:
        self.streams = 0

    @property
    def tick_s(self) -> float:
        return max(self.MIN_TICK_S, self.streams / self.WRITES_PER_SECOND)


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class DroppedResponse(Response):
    """Announces the whole body, sends half of it, then abandons the connection."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body[: len(self.body) // 2], "more_body": True})
        raise ConnectionAbortedError("emulator: connection dropped mid-response (injected fault)")


class EventStreamResponse(Response):
    """A streamed reply from its first token on: the content events when due (paced at the output speed),
    then, once the output is complete, the closing events. A dropped connection stops half-way, an injected
    error replaces the second half with an `error` event. The reply is accounted for (`finish`) when its last
    token is produced or the stream is cut."""

    media_type = "text/event-stream"

    def __init__(
        self,
        completion: Completion,
        headers: dict[str, str],
        *,
        error: bytes | None,
        pacing: StreamPacing,
        framing: Callable[[bytes], bytes] | None = None,
        media_type: str | None = None,
    ) -> None:
        super().__init__(headers=headers, media_type=media_type or self.media_type)
        # A stream has no length known in advance: chunked transfer, as the API answers.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.completion = completion
        self.stream = paced_stream(completion.message, completion.output_s)
        # Each server-sent event as the wire carries it: as it is, or framed (Bedrock's event-stream).
        frame = framing or (lambda event: event)
        self.content = [(due, frame(event)) for due, event in self.stream.content]
        self.closing = [frame(event) for event in self.stream.closing]
        self.error = frame(error) if error is not None else None
        self.pacing = pacing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        content, closing = self.content, self.closing
        cut_short = self.completion.drop_connection or self.error is not None
        cut = (len(content) + len(closing)) // 2 if cut_short else len(content)
        self.pacing.streams += 1
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            due_now = await self._send_when_due(send, content[:cut], started)
            if not cut_short:
                await asyncio.sleep(max(0.0, started + self.stream.output_s - loop.time()))
            self.completion.finish()
            if self.completion.drop_connection:
                if due_now:
                    await send({"type": "http.response.body", "body": b"".join(due_now), "more_body": True})
                raise ConnectionAbortedError("emulator: connection dropped mid-stream (injected fault)")
            tail = due_now + (closing if self.error is None else [self.error])
            await send({"type": "http.response.body", "body": b"".join(tail), "more_body": False})
        finally:
            self.pacing.streams -= 1
            self.completion.finish()

    async def _send_when_due(self, send: Send, events: list[tuple[float, bytes]], started: float) -> list[bytes]:
        """Send each event once `started` + its due time (seconds on the loop's clock) has come, one sleep
        per write; return the last ones due, not yet sent."""
        loop = asyncio.get_running_loop()
        ready: list[bytes] = []
        for due, event in events:
            wait = started + due - loop.time()
            if wait > 0:
                if ready:
                    await send({"type": "http.response.body", "body": b"".join(ready), "more_body": True})
                    ready = []
                await asyncio.sleep(max(wait, self.pacing.tick_s))
            ready.append(event)
        return ready


class _QuietDrops(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage() + str(record.exc_info[1] if record.exc_info else "")
        return "injected fault" not in text and "without completing response" not in text


def create_app(config: EmulatorConfig | None = None) -> Starlette:
    config = config or EmulatorConfig()
    api = EmulatedAnthropic(config)
    batches = BatchStore(api)
    pacing = StreamPacing()
    for name in ("uvicorn.error", "uvicorn"):
        logging.getLogger(name).addFilter(_QuietDrops())

    def error_response(error: APIError, request_id: str) -> Response:
        api.ledger.responses_by_status[error.status] += 1
        headers = {"request-id": request_id, **error.headers}
        return JSONResponse(error.envelope(request_id), status_code=error.status, headers=headers)

    def ok(content: Any, request_id: str, headers: dict[str, str] | None = None) -> Response:
        api.ledger.responses_by_status[200] += 1
        return JSONResponse(content, headers={"request-id": request_id, **(headers or {})})

    async def messages(request: Request) -> Response:
        request_id = new_id("req")
        api.ledger.requests_total += 1
        try:
            raw = await request.body()
            caller = await authenticate(request, raw)
            body = api.parse_json(raw)
            completion = await api.create_message(caller, raw, body)
        except APIError as error:
            return error_response(error, request_id)
        headers = {"request-id": request_id, **completion.headers}
        api.ledger.responses_by_status[200] += 1
        if completion.stream:
            overloaded = error_event(APIError(529, "Overloaded").error_object()) if completion.stream_error else None
            return EventStreamResponse(
                completion, {**headers, "cache-control": "no-cache"}, error=overloaded, pacing=pacing
            )
        if completion.drop_connection:
            return DroppedResponse(orjson.dumps(completion.message), headers=headers, media_type="application/json")
        return JSONResponse(completion.message, headers=headers)

    async def authenticate(request: Request, raw: bytes) -> Caller:
        """The first-party API's caller: by its key; on Claude Platform on AWS also by a SigV4 signature for
        `aws-external-anthropic`, with the workspace it names (`anthropic-workspace-id`)."""
        if request.headers.get("authorization", "").startswith("AWS4-HMAC-SHA256"):
            secrets = {TEST_AWS_ACCESS_KEY: TEST_AWS_SECRET_KEY}
            signer = verify_sigv4(
                request.method, _url_as_sent(request), request.headers, raw, service=AWS_SERVICE, secrets=secrets
            )
            if not request.headers.get("anthropic-workspace-id"):
                raise APIError(400, "anthropic-workspace-id: header is required on Claude Platform on AWS")
            return api.authenticate({**request.headers, "x-api-key": signer})
        return api.authenticate(request.headers)

    async def platform_messages(
        request: Request, to_request: Any, to_error: Any, framing: Callable[[bytes], bytes] | None = None
    ) -> Response:
        """A message through a cloud's surface (see platforms.py): its request made first-party, its answer
        in the platform's shape."""
        request_id = new_id("req")
        api.ledger.requests_total += 1
        raw = await request.body()
        try:
            asked = to_request(request, raw, api.parse_json(raw))
            completion = await api.create_message(asked.caller, orjson.dumps(asked.body), asked.body)
        except APIError as error:
            api.ledger.responses_by_status[error.status] += 1
            status, body, headers = to_error(error)
            return JSONResponse(body, status_code=status, headers={"request-id": request_id, **headers})
        headers = without_limit_headers({"request-id": request_id, **completion.headers})
        api.ledger.responses_by_status[200] += 1
        if completion.stream:
            overloaded = error_event(APIError(529, "Overloaded").error_object()) if completion.stream_error else None
            media_type = "application/vnd.amazon.eventstream" if framing is not None else None
            return EventStreamResponse(
                completion, {**headers, "cache-control": "no-cache"}, error=overloaded, pacing=pacing,
                framing=framing, media_type=media_type,
            )  # fmt: skip
        if completion.drop_connection:
            return DroppedResponse(orjson.dumps(completion.message), headers=headers, media_type="application/json")
        return JSONResponse(completion.message, headers=headers)

    def _url_as_sent(request: Request) -> str:
        """The URL as the client signed it: its path undecoded (a model id may hold an escaped `/`)."""
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        query = request.scope.get("query_string", b"")
        base = f"{request.url.scheme}://{request.headers.get('host', request.url.netloc)}{raw_path.decode('latin-1')}"
        return f"{base}?{query.decode('latin-1')}" if query else base

    async def bedrock(request: Request) -> Response:
        def to_request(request: Request, raw: bytes, body: Any) -> Any:
            params = request.path_params
            return bedrock_request(
                request.method, _url_as_sent(request), params["model"], params["action"], request.headers, raw, body
            )

        return await platform_messages(request, to_request, bedrock_error, bedrock_stream_frame)

    async def vertex(request: Request) -> Response:
        def to_request(request: Request, raw: bytes, body: Any) -> Any:
            model, _, action = request.path_params["model_action"].partition(":")
            return vertex_request(model, action, request.headers, body)

        return await platform_messages(request, to_request, vertex_error)

    async def count_tokens(request: Request) -> Response:
        request_id = new_id("req")
        api.ledger.requests_total += 1
        try:
            raw = await request.body()
            caller = await authenticate(request, raw)
            counted, headers = api.count_tokens(caller, api.parse_json(raw))
            return ok(counted, request_id, headers)
        except APIError as error:
            return error_response(error, request_id)

    def batch_endpoint(handler):
        async def endpoint(request: Request) -> Response:
            request_id = new_id("req")
            try:
                caller = await authenticate(request, await request.body())
                return await handler(request, caller, request_id)
            except APIError as error:
                return error_response(error, request_id)

        return endpoint

    async def batch_collection(request: Request, caller: Caller, request_id: str) -> Response:
        key = caller.key
        if request.method == "POST":
            raw = await request.body()
            base_url = str(request.base_url).rstrip("/")
            return ok(batches.create(caller, api.parse_json(raw), len(raw), base_url), request_id)
        params = request.query_params
        try:
            limit = int(params.get("limit", "20"))
        except ValueError:
            raise APIError(400, "limit: Input should be a valid integer") from None
        return ok(batches.list(key, limit, params.get("after_id"), params.get("before_id")), request_id)

    async def batch_item(request: Request, caller: Caller, request_id: str) -> Response:
        key = caller.key
        batch_id = request.path_params["batch_id"]
        if request.method == "DELETE":
            return ok(batches.delete(key, batch_id), request_id)
        return ok(batches.retrieve(key, batch_id), request_id)

    async def batch_cancel(request: Request, caller: Caller, request_id: str) -> Response:
        return ok(batches.cancel(caller.key, request.path_params["batch_id"]), request_id)

    async def batch_results(request: Request, caller: Caller, request_id: str) -> Response:
        body = batches.results(caller.key, request.path_params["batch_id"])
        api.ledger.responses_by_status[200] += 1
        return Response(body, media_type="application/binary", headers={"request-id": request_id})

    async def stats(request: Request) -> Response:
        return JSONResponse(api.ledger.as_dict())

    async def billed_requests(request: Request) -> Response:
        """One key's billed requests (`request_log` on) and its requests in flight now: a client's key, so that
        runs sharing one emulator each read their own."""
        key = request.query_params.get("key", "")
        return JSONResponse({"in_flight": api.in_flight(key), "requests": api.ledger.requests_of(key)})

    async def reset(request: Request) -> Response:
        api.reset()
        batches.reset()
        return JSONResponse({"reset": True})

    async def advance_clock(request: Request) -> Response:
        api.clock_offset += float(request.query_params.get("seconds", "0"))
        return JSONResponse({"clock_offset": api.clock_offset})

    first_party = [
        Route("/v1/messages", messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
        Route("/v1/messages/batches", batch_endpoint(batch_collection), methods=["GET", "POST"]),
        Route("/v1/messages/batches/{batch_id}", batch_endpoint(batch_item), methods=["GET", "DELETE"]),
        Route("/v1/messages/batches/{batch_id}/cancel", batch_endpoint(batch_cancel), methods=["POST"]),
        Route("/v1/messages/batches/{batch_id}/results", batch_endpoint(batch_results), methods=["GET"]),
    ]
    app = Starlette(
        routes=[
            *first_party,
            # Claude on Google Cloud: the first-party API under a workspace of a project.
            Mount("/v1/projects/{project}/locations/{location}/workspaces/{workspace}/invoke", routes=first_party),
            Route("/model/{model}/{action}", bedrock, methods=["POST"]),
            Route(
                "/v1/projects/{project}/locations/{location}/publishers/anthropic/models/{model_action}",
                vertex,
                methods=["POST"],
            ),
            Route("/_emulator/stats", stats, methods=["GET"]),
            Route("/_emulator/requests", billed_requests, methods=["GET"]),
            Route("/_emulator/reset", reset, methods=["POST"]),
            Route("/_emulator/advance", advance_clock, methods=["POST"]),
        ]
    )
    app.state.api = api
    app.state.batches = batches
    return app
