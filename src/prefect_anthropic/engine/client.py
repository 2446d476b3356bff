"""The rate-limited async Anthropic client: one request in, one result record out.

For each request it estimates input and output tokens, waits for a concurrency slot and for the rate
limiter of the model's class, sends, reconciles the limiter with the server's headers and the real
`usage`, and retries what the official SDK retries. Errors that every later request would meet too (a bad
key, no credit, no permission, the spend cap) stop the client for good: nothing more is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import httpx
import orjson

from ..api.models import ModelInfo, Usage, model_table, unpriced_reason, use_models_file
from ..api.request_rules import FAST_MODE_BETA
from ..api.schema import OutputSchema, SchemaError, load_schema, output_format_of, with_output_format
from ..settings import API_KEY_ENV, DEFAULT_BASE_URL, ClientSettings, MissingAPIKeyError
from .account import Account, LimitsForClass, auth_headers
from .adaptive import AdaptiveWindow
from .budget import Budget, BudgetHold, unbudgeted_reason, worst_case_cost
from .caching import AutoCache, PrefixWarmer, cached_prefix
from .errors import APIStatusError, FatalAPIError, OutputLost, RunStopped, ServiceUnavailableError
from .estimator import InputTokenEstimator, OutputTokenEstimator
from .limiter import Admission, Limiter, RateLimits, admitted
from .preflight import Preflight
from .records import RequestItem, ResultRecord, record_from_message, validate_record
from .retry import RetryPolicy, retry_after_seconds
from .shared_limiter import SharedLimiter, SharedLimiterUnavailable
from .streaming import accumulate, needs_streaming

__all__ = ["DEFAULT_BASE_URL", "AnthropicClient", "ClientStats", "auth_headers"]

T = TypeVar("T")
#: What to call when the rate limiter lets the current request go (see `AnthropicClient.send`).
_ON_ADMITTED: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("on_admitted", default=None)
#: Answers that say the other side is full: the concurrency window shrinks.
_OVERLOAD_STATUSES = frozenset({503, 529})
logger = logging.getLogger(__name__)


@dataclass
class ClientStats:
    # Counters of HTTP traffic, alike in shape only to UsageTotals' counters of tokens and dollars.
    http_requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    server_errors: int = 0
    connection_errors: int = 0
    #: Cache pre-warm requests (max_tokens 0): not rows of the dataset, but paid for.
    prewarm_requests: int = 0
    prewarm_cost_usd: float = 0.0
    prewarm_cache_creation_input_tokens: int = 0
    #: 429s for usage growing too fast (`ramp_limit_exceeded`), retried after retry-after.
    ramp_limited: int = 0
    #: HTTP requests sent with `stream: true` (long outputs), retries included.
    streamed_requests: int = 0
    #: Requests sent again with the invalid reply and the validation error fed back.
    validation_repairs: int = 0


class AnthropicClient:
    """Sends Messages API requests as fast as the account's limits allow and no faster.

    Reads everything it does from a `ClientSettings` (options given as keywords are laid over it, like the
    SDK's `with_options`). Clients of one account in a process share its limiters, concurrency and
    connections (`Account`), never each other's budget, statistics or lifetime: whoever opens a client
    closes it (`async with`).

    `limits` (one `RateLimits` for every class, or a function of the limit class), `retry`, the
    estimators, `seed` and `burst_seconds` replace what the settings would give, for tests and benchmarks.
    `budget` is the run's (a dataset's journaled budget, or one shared through Redis); by default one is made
    from `max_cost_usd`.
    """

    def __init__(
        self,
        api_key: str,
        settings: ClientSettings | None = None,
        *,
        budget: Budget | None = None,
        limits: RateLimits | LimitsForClass | None = None,
        retry: RetryPolicy | None = None,
        input_estimator: InputTokenEstimator | None = None,
        output_estimator: OutputTokenEstimator | None = None,
        seed: int | None = None,
        burst_seconds: float = 0.5,
        fence: Callable[[], Awaitable[None]] | None = None,
        limiter_url: str | None = None,
        **options: Any,
    ) -> None:
        if not api_key:
            raise MissingAPIKeyError(
                f"No Anthropic API key: set {API_KEY_ENV}, pass --api-key, or name an AnthropicCredentials block."
            )
        settings = settings or ClientSettings()
        self.settings = settings = settings.with_options(**options) if options else settings
        #: The model table the run prices and checks by: the shipped one, extended by the settings' models
        #: file (read now: a wrong file fails here, naming it), else by the environment's.
        self.models = use_models_file(settings.models_file) if settings.models_file else model_table()
        self._api_key = api_key
        self._account: Account | None = None
        self._account_options: dict[str, Any] = {
            "limits": _same_for_every_class(limits) if isinstance(limits, RateLimits) else limits,
            "burst_seconds": burst_seconds,
            # The shared limiter's Redis, password included (resolved at the edge: a flag, the environment
            # or a block); by default the settings' own.
            "limiter_url": limiter_url or settings.redis_url,
            "input_estimator": input_estimator,
            "output_estimator": output_estimator,
        }
        self.base_url = settings.api_base_url
        self.anthropic_version = settings.api_version
        self.max_concurrency = settings.max_concurrency
        self.preflight = Preflight(
            self.anthropic_version, drop_unsupported_params=settings.drop_unsupported_params, models=self.models
        )
        #: Every request asks for replies matching it (a line's own format wins); replies are validated.
        self.output_schema = OutputSchema(settings.output_schema) if settings.output_schema is not None else None
        self.validation_retries = settings.validation_retries
        self.retry = retry or RetryPolicy(max_attempts=settings.max_attempts)
        self.include_request = settings.include_request
        #: This run's spending: a hard limit when `max_cost_usd` is set, and the journal of what was paid.
        self.budget: Budget | None = budget
        if budget is None and settings.max_cost_usd is not None:
            self.budget = Budget(settings.max_cost_usd)
        self._line_schemas: dict[bytes, OutputSchema | None] = {}
        self._waiting: tuple[str, float] | None = None
        self.stats = ClientStats()
        self.fatal_error: FatalAPIError | None = None
        self.warmer = PrefixWarmer() if settings.use_caching or settings.auto_cache else None
        self.auto_cache = AutoCache() if settings.auto_cache else None
        self.stopping = False
        self._closed = False
        #: Models answered but not priced by the model table, with the reason (rows get cost_usd null).
        self.unpriced_models: dict[str, str] = {}
        self._rng = random.Random(seed)
        #: Awaited right before each request leaves: raises OutputLost when the run no longer holds its output.
        self.fence = fence

    @property
    def account(self) -> Account:
        """The account's shared state in this event loop (taken on first use, given back by `aclose`)."""
        if self._account is None:
            if self._closed:
                raise RuntimeError("the client is closed")
            self._account = Account.acquire(self._api_key, self.settings, **self._account_options)
        return self._account

    async def __aenter__(self) -> AnthropicClient:
        self.account  # noqa: B018 - taken now, in the loop that will use it
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.budget is not None:
            await self.budget.aclose()
        if self._account is not None:
            await self._account.release()  # kept: what it learned stays readable after the run

    # The account's parts, read through the client (alike in shape only to the run's parts in pipeline.py).
    @property
    def shared_limiter(self) -> SharedLimiter | None:
        return self.account.shared_limiter

    @property
    def input_estimator(self) -> InputTokenEstimator:
        return self.account.input_estimator

    @property
    def output_estimator(self) -> OutputTokenEstimator:
        return self.account.output_estimator

    async def check_limiter(self) -> None:
        """Raise SharedLimiterUnavailable when the shared limiter's Redis does not answer."""
        if self.shared_limiter is not None:
            await self.shared_limiter.check()

    def limiter(self, model: str, speed: Any = None) -> Limiter:
        return self.account.limiter(model, speed)

    def window(self, model: str, speed: Any = None) -> AdaptiveWindow:
        return self.account.window(model, speed)

    def limits_in_force(self) -> dict[str, RateLimits]:
        return {cls: limiter.limits for cls, limiter in self.account.limiters.items()}

    @property
    def in_flight(self) -> int:
        return self.account.in_flight

    def stop_admitting(self) -> None:
        """Send nothing new: requests waiting for a slot or the limiter raise RunStopped instead."""
        self.stopping = True

    def _raise_if_stopped(self) -> None:
        if self.fatal_error is not None:
            raise self.fatal_error
        if self.stopping:
            raise RunStopped("the run is stopping; nothing new is sent")

    def _error_record(self, item: RequestItem, error_type: str, message: str, **fields: Any) -> ResultRecord:
        request = item.body if self.include_request else None
        return ResultRecord.errored(item, error_type, message, request=request, **fields)

    @property
    def warnings(self) -> list[str]:
        return list(self.warmer.warnings) if self.warmer is not None else []

    async def send(self, item: RequestItem, *, on_admitted: Callable[[], None] | None = None) -> ResultRecord:
        """Send one request, with retries; raise FatalAPIError when the run must stop. `on_admitted` is called
        when the rate limiter first lets it go (a caller reading input ahead of the limiter stops there)."""
        token = _ON_ADMITTED.set(on_admitted)
        try:
            return await self._send_item(item)
        finally:
            _ON_ADMITTED.reset(token)

    async def _send_item(self, item: RequestItem) -> ResultRecord:
        if self._closed:
            raise RuntimeError("the client is closed: open a new one (async with AnthropicClient(...))")
        if item.invalid is not None:
            return ResultRecord.for_invalid_line(item)
        checked = self.preflight(item)  # a line the API would reject is an error row, never sent
        if isinstance(checked, ResultRecord):
            return checked
        item = checked
        if self.output_schema is not None:
            item = dataclasses.replace(item, body=with_output_format(item.body, self.output_schema))
        self._raise_if_stopped()
        info = self.models.lookup(item.model)
        ratio = self.input_estimator.ratio(item.model)
        if self.auto_cache is not None:
            body = self.auto_cache.apply(
                item.body,
                lambda blocks: int(self.input_estimator.count_blocks_cl100k(blocks) * ratio),
                info.min_cacheable_tokens if info is not None else None,
            )
            if body is not item.body:
                item = dataclasses.replace(item, body=body)
        warmer = self.warmer
        prefix = cached_prefix(item.body) if warmer is not None else None
        if warmer is None or prefix is None:
            return await self._send_validated(item)
        prefix_tokens = int(self.input_estimator.count_blocks_cl100k(prefix.blocks) * ratio)
        minimum = info.min_cacheable_tokens if info is not None else None
        await warmer.before_send(prefix, lambda: self._prewarm(item), prefix_tokens, minimum, item.model)
        cacheable = minimum is None or prefix_tokens >= minimum
        record = await self._send_validated(item, cached_tokens_expected=prefix_tokens if cacheable else 0)
        if record.succeeded:
            warmer.observe(prefix, record.cache_read_input_tokens)
        return record

    def _schema_of(self, body: dict[str, Any]) -> OutputSchema | None:
        """The schema a reply must match: ours, or the line's own (None: no structured output)."""
        fmt = output_format_of(body)
        if fmt is None:
            return None
        if self.output_schema is not None and fmt == self.output_schema.output_format():
            return self.output_schema
        key = orjson.dumps(fmt.get("schema"), option=orjson.OPT_SORT_KEYS)
        if key not in self._line_schemas:
            try:
                self._line_schemas[key] = load_schema(fmt.get("schema") or {})
            except (SchemaError, ValueError):
                self._line_schemas[key] = None  # the API refuses it: its 400 is the row's answer
        return self._line_schemas[key]

    async def _send_validated(self, item: RequestItem, cached_tokens_expected: int = 0) -> ResultRecord:
        """Send; with structured outputs, validate the reply against the full schema and, while it does not
        match, ask again with the invalid reply and the validation error fed back (as instructor does).
        Every attempt's tokens, cost and HTTP attempts are counted in the row."""
        record = await self._send(item, cached_tokens_expected)
        schema = self._schema_of(item.body)
        if schema is None:
            return record
        spent: list[ResultRecord] = []
        for repair in range(self.validation_retries + 1):
            spent.append(record)
            last_try = repair == self.validation_retries
            if validate_record(record, schema, replies=repair + 1, last_try=last_try) or last_try:
                break
            self.stats.validation_repairs += 1
            problem = record.validation_error or ""
            item = dataclasses.replace(item, body=_repair_body(item.body, record.text or "", problem))
            record = await self._send(item, cached_tokens_expected)
        return _combined(spent)

    async def _prewarm(self, item: RequestItem) -> None:
        warm = RequestItem(line=0, custom_id=f"prewarm-{item.custom_id}", body={**item.body, "max_tokens": 0})
        record = await self._send(warm)  # an empty reply: nothing to validate
        self.stats.prewarm_requests += 1
        self.stats.prewarm_cost_usd += record.cost_usd or 0.0
        self.stats.prewarm_cache_creation_input_tokens += record.cache_creation_input_tokens
        if not record.succeeded:
            logger.warning("Cache pre-warm for %s failed: %s", item.custom_id, record.error_message)

    async def _send(self, item: RequestItem, cached_tokens_expected: int = 0) -> ResultRecord:
        """Send one request, retrying what the SDK retries; the row of its answer or of its last error."""
        request = self._prepare(item, cached_tokens_expected)
        failure: _Failure | None = None
        attempt = 0
        while attempt < self.retry.max_attempts:
            attempt += 1
            try:
                async with self._budget_hold(request) as hold:
                    if hold is None:
                        return self._budget_record(
                            item, request.info, attempt - 1, request.estimated_input, request.errors
                        )
                    outcome = await self._attempt(request, attempt, hold)
            except SharedLimiterUnavailable as error:  # a shared budget or limiter that cannot be asked
                self._stop_for(error)
            if isinstance(outcome, ResultRecord):
                return outcome
            failure = outcome
            if not failure.retryable:
                break
            if attempt < self.retry.max_attempts:
                self.stats.retries += 1
                delay = self.retry.delay(attempt - 1, failure.retry_headers, self._rng)
                last = failure.error
                self._waiting = (f"{last.status or ''} {last.error_type}".strip(), time.monotonic() + delay)
                await asyncio.sleep(delay)
        assert failure is not None
        last = failure.error
        return self._error_record(
            item,
            last.error_type,
            last.message,
            http_status=last.status or None,
            request_id=last.request_id,
            attempts=attempt,
            estimated_input_tokens=request.estimated_input,
            errors=request.errors,
        )

    def _prepare(self, item: RequestItem, cached_tokens_expected: int) -> _Request:
        body = item.body
        model = item.model
        cl100k = self.input_estimator.count_cl100k(body)
        estimated_input = self.input_estimator.estimate(body, cl100k)
        max_tokens = body.get("max_tokens")
        max_tokens = max_tokens if isinstance(max_tokens, int) and max_tokens >= 0 else 4096
        # Too long to answer within the SDK's non-streaming limit: streamed, and accumulated into one Message.
        streaming = bool(body.get("stream")) or needs_streaming(max_tokens)
        info = self.models.lookup(model)
        # A value object built by keyword, alike in shape only to the emulator's ParsedRequest (other fields).
        return _Request(
            item=item,
            model=model,
            info=info,
            cl100k=cl100k,
            estimated_input=estimated_input,
            cached_tokens_expected=cached_tokens_expected,
            max_tokens=max_tokens,
            streaming=streaming,
            payload=orjson.dumps({**body, "stream": True} if streaming else body),
            headers={"anthropic-beta": FAST_MODE_BETA} if _needs_fast_beta(info, body) else None,
            limiter=self.limiter(model, body.get("speed")),
            window=self.window(model, body.get("speed")),
        )

    async def _attempt(self, request: _Request, attempt: int, hold: BudgetHold) -> ResultRecord | _Failure:
        """One HTTP attempt: a place in the class's window and a slot, then the limiter; send, and settle the
        limiter, the budget, the window and the breaker by what came back. Each hold is an `async with` that
        gives back what a request that never left took."""
        async with request.window.slot(), self.account.slots:  # the window adapts to overload
            self._raise_if_stopped()
            # Both estimates are taken when the limiter admits the request: what was learned while it waited
            # counts.
            async with admitted(
                request.limiter,
                lambda: self._charged_input(request),
                lambda: self.output_estimator.reserve(request.model, request.max_tokens),
            ) as admission:
                admitted_now = _ON_ADMITTED.get()
                if admitted_now is not None:
                    admitted_now()
                await hold.journal()  # in the journal a rerun reads before it is sent (on a bucket: written)
                if self.fence is not None and not self._stopping_now():
                    try:
                        await self.fence()
                    except OutputLost as lost:
                        self._stop_for(lost)
                self._raise_if_stopped()
                hold.left = admission.left = True
                return await self._exchange_and_settle(request, attempt, hold, admission)

    async def _exchange_and_settle(
        self, request: _Request, attempt: int, hold: BudgetHold, admission: Admission
    ) -> ResultRecord | _Failure:
        window, errors = request.window, request.errors
        started = time.monotonic()
        self.stats.http_requests += 1
        self.stats.streamed_requests += request.streaming
        try:
            status, headers, answer, streamed = await self._exchange(
                request.payload, request.headers, request.streaming
            )
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            # The server may have processed it: the reservations stay spent, as it may have been charged.
            self.stats.connection_errors += 1
            kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection_error"
            errors.append(f"{kind}: {exc!r}")
            window.on_overload()  # a reset connection is the other side giving up on us
            self._note_failure(window, kind)
            return _Failure(APIStatusError(0, kind, repr(exc)))
        latency = time.monotonic() - started
        admission.limiter.observe_headers(headers)
        if status == 200:
            if isinstance(answer, dict):
                self.account.breaker(window).on_success()
                record = self._succeeded(request, answer, admission, attempt, latency, headers.get("request-id"))
                hold.settle(record.cost_usd)
                charged = record.input_tokens + record.cache_creation_input_tokens
                window.on_success(latency, charged, record.output_tokens)
                return record
            errors.append("invalid_response: the 200 response body is not a JSON object")  # billed, unreadable
            return _Failure(APIStatusError(status, "invalid_response", "unparseable 200 response body"))
        error = APIStatusError.from_body(status, answer, headers.get("request-id"))
        errors.append(str(error))
        admission.refund()
        if not streamed:
            # An error answer before any work: not billed. (An `error` event after a stream began: the work
            # had started, so it may have been: the hold's exit spends it.)
            hold.refund()
        if isinstance(error, FatalAPIError):
            self._stop_for(error)
        if status == 429:
            self.stats.rate_limited += 1
            self.stats.ramp_limited += error.error_code == "ramp_limit_exceeded"
            # Hold the whole class, not just this request, so in-flight peers do not stampede.
            admission.limiter.pause(retry_after_seconds(headers) or self.retry.delay(attempt - 1, rng=self._rng))
        elif status >= 500:
            self.stats.server_errors += 1
        if status in _OVERLOAD_STATUSES:
            window.on_overload()
        if not self.retry.is_retryable(status, headers):
            return _Failure(error, retryable=False)
        self._note_failure(window, f"{status} {error.error_type}")
        return _Failure(error, dict(headers))

    def _charged_input(self, request: _Request) -> int:
        """The input tokens the limiter takes for the request now: the estimate with what is learned so far,
        less a warm cached prefix (cache reads do not count toward input tokens/min)."""
        request.estimated_input = self.input_estimator.estimate(request.item.body, request.cl100k)
        return max(1, request.estimated_input - request.cached_tokens_expected)

    def _note_failure(self, window: AdaptiveWindow, status: str) -> None:
        """A retryable failure; when nothing of the class has succeeded for too long, the run gives up."""
        breaker = self.account.breaker(window)
        if breaker.on_failure(status) and self.fatal_error is None:
            self.fatal_error = ServiceUnavailableError(
                0,
                "service_unavailable",
                f"no request to the {window.name} models succeeded for {breaker.give_up_after_s:,.0f} s; the API "
                f"answered {breaker.describe()}",
            )
            logger.error("%s", self.fatal_error)
        if self.fatal_error is not None:
            raise self.fatal_error

    @property
    def waiting(self) -> str | None:
        """What the client is waiting on now (a backoff or a class-wide pause), for the progress bar."""
        now = time.monotonic()
        if self._waiting is not None and self._waiting[1] > now:
            return f"waiting: {self._waiting[0]}, retry in {self._waiting[1] - now:,.0f} s"
        limiters = self.account.limiters.items() if self._account is not None else ()
        paused = [(cls, lim.paused_until) for cls, lim in limiters if lim.paused_until > now]
        if paused:
            cls, until = max(paused, key=lambda p: p[1])
            return f"waiting: {cls} paused by a 429, retry in {until - now:,.0f} s"
        return None

    def concurrency(self) -> dict[str, int]:
        """The lowest window and the final one over the limit classes."""
        windows = self.account.windows if self._account is not None else {}
        if not windows:
            return {"concurrency_min": self.max_concurrency, "concurrency_final": self.max_concurrency}
        return {
            "concurrency_min": min(max(1, int(w.minimum_seen)) for w in windows.values()),
            "concurrency_final": min(w.size for w in windows.values()),
        }

    def _stop_for(self, error: FatalAPIError) -> NoReturn:
        """The run must stop: the first fatal error is the one every later send raises."""
        if self.fatal_error is None:
            self.fatal_error = error
        raise error

    def _stopping_now(self) -> bool:
        return self.fatal_error is not None or self.stopping

    @contextlib.asynccontextmanager
    async def _budget_hold(self, request: _Request) -> AsyncIterator[BudgetHold | None]:
        """The attempt's worst case held in the budget (waiting while attempts in flight hold the room); None
        when it cannot fit (or cannot be bounded: a budget cannot be kept for an unpriced model, nor for
        content or server tools whose worst case the model table cannot bound, see unbudgeted_reason)."""
        if self.budget is None:
            yield BudgetHold(None, 0.0, None)
            return
        info = request.info or request.model
        worst = worst_case_cost(info, request.item.body, payload_bytes=len(request.payload), models=self.models)
        if worst is None and self.budget.limit_usd is not None:
            yield None
            return
        async with self.budget.hold(worst or 0.0) as hold:  # no limit to keep: the journal records the cost
            yield hold

    def _budget_record(
        self, item: RequestItem, info: ModelInfo | None, attempts: int, estimated_input: int, errors: list[str]
    ) -> ResultRecord:
        assert self.budget is not None
        why = None
        unbudgeted = unbudgeted_reason(info or item.model, item.body, self.models)
        if unbudgeted is not None:
            why = f"a budget cannot be kept for it: {unbudgeted}"
        return self.budget.exhausted_record(
            item,
            why,
            attempts=attempts,
            estimated_input_tokens=estimated_input,
            errors=errors,
            request=item.body if self.include_request else None,
        )

    async def _exchange(
        self, payload: bytes, headers: dict[str, str] | None, streaming: bool
    ) -> tuple[int, httpx.Headers, Any, bool]:
        """Send one request: (status, headers, the parsed body: a Message, an error envelope or text, and
        whether a stream had begun)."""
        account = self.account
        lane = account.take_lane()
        try:
            if not streaming:
                response = await lane.post("/v1/messages", content=payload, headers=headers)
                return response.status_code, response.headers, _parsed_body(response.content), False
            async with lane.stream("POST", "/v1/messages", content=payload, headers=headers) as response:
                if response.status_code != 200:
                    return response.status_code, response.headers, _parsed_body(await response.aread()), False
                status, answer = await accumulate(response)
                return status, response.headers, answer, True
        finally:
            account.give_lane(lane)

    def _succeeded(
        self,
        request: _Request,
        message: dict[str, Any],
        admission: Admission,
        attempt: int,
        latency: float,
        request_id: str | None,
    ) -> ResultRecord:
        item, cl100k = request.item, request.cl100k
        usage = Usage.from_api(message.get("usage"))
        model = str(message.get("model") or item.model)
        info = self.models.lookup(model)
        charged = usage.input_tokens + usage.cache_creation_input_tokens
        if info is not None and info.cache_reads_count_toward_itpm:
            charged += usage.cache_read_input_tokens
        admission.settle(charged, usage.output_tokens)
        self.input_estimator.observe(item.model, cl100k, usage.total_input_tokens)
        if item.body.get("max_tokens"):
            self.output_estimator.observe(item.model, usage.output_tokens)
        record = record_from_message(
            item,
            message,
            models=self.models,
            attempts=attempt,
            latency_s=round(latency, 6),
            request_id=request_id,
            estimated_input_tokens=request.estimated_input,
            request=item.body if self.include_request else None,
            errors=request.errors,
        )
        if record.cost_usd is None:
            self._note_unpriced(model, info, usage)
        return record

    def _note_unpriced(self, model: str, info: ModelInfo | None, usage: Usage) -> None:
        if model not in self.unpriced_models:
            why = unpriced_reason(info or model, usage) or "unknown"
            self.unpriced_models[model] = why
            logger.warning(
                "No price for %s: %s; its rows get cost_usd null. Add its prices with --models-file.", model, why
            )


@dataclass
class _Request:
    """One request as it is sent, attempt after attempt."""

    item: RequestItem
    model: str
    info: ModelInfo | None
    cl100k: int
    estimated_input: int
    cached_tokens_expected: int
    max_tokens: int
    streaming: bool
    payload: bytes
    headers: dict[str, str] | None
    limiter: Limiter
    window: AdaptiveWindow
    #: Every error met on the way (the original script's output lists them).
    errors: list[str] = field(default_factory=list)


@dataclass
class _Failure:
    """An attempt that did not give an answer: the error, and whether (and how) to try again."""

    error: APIStatusError
    retry_headers: dict[str, str] | None = None
    retryable: bool = True


def _repair_body(body: dict[str, Any], reply: str, problem: str) -> dict[str, Any]:
    """The request again, with the invalid reply and what is wrong with it fed back."""
    feedback = (
        f"Your reply did not match the required JSON schema: {problem}. Reply again with only JSON that "
        "matches the schema."
    )
    turns = [{"role": "assistant", "content": reply or "(empty reply)"}, {"role": "user", "content": feedback}]
    return {**body, "messages": [*body["messages"], *turns]}


def _combined(spent: list[ResultRecord]) -> ResultRecord:
    """The last attempt's row, with the tokens, cost and attempts of every reply it took."""
    final = spent[-1]
    if len(spent) == 1:
        return final
    costs = [record.cost_usd for record in spent]
    return dataclasses.replace(
        final,
        cost_usd=None if any(cost is None for cost in costs) else sum(c for c in costs if c is not None),
        attempts=sum(record.attempts for record in spent),
        input_tokens=sum(record.input_tokens for record in spent),
        output_tokens=sum(record.output_tokens for record in spent),
        cache_creation_input_tokens=sum(record.cache_creation_input_tokens for record in spent),
        cache_read_input_tokens=sum(record.cache_read_input_tokens for record in spent),
        thinking_tokens=sum(record.thinking_tokens for record in spent),
        latency_s=round(sum(record.latency_s for record in spent), 6),
        errors=[error for record in spent for error in record.errors],
    )


def _parsed_body(content: bytes) -> Any:
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return content.decode("utf-8", "replace")


def _same_for_every_class(value: T) -> Callable[[str], T]:
    return lambda _limit_class: value


def _needs_fast_beta(info: ModelInfo | None, body: dict[str, Any]) -> bool:
    """Fast mode in preview needs its beta header; a request file cannot carry headers, so the client adds it."""
    return body.get("speed") == "fast" and info is not None and info.fast_mode == "preview"
