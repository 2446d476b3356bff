"""One run per output: a run acts only while it can prove it holds its output.

Two runs writing one dataset would both send every request (and both pay for it). So a run takes a hold
on its output before anything is sent, and keeps proving it until the end:

- A local directory: an OS file lock (`filelock`: `flock` on Unix), which the OS releases when the process
  ends, however it ends. A paused process keeps it: nobody can take it over, so there is nothing to prove.
- Object storage (`s3://`, `gs://`, `az://`, `memory://`): a lease object beside the output
  (`.prefect-anthropic.lease`), created only if absent (a conditional write), renewed every 10 s on the
  condition that it is still the version this run wrote (ETag / generation), and taken over by another run
  only when it has not been renewed for 30 s by the store's own clock. A store that cannot write
  conditionally is refused unless a Redis lock is given (`--limiter-url`).
- With a shared limiter (`--limiter-url`), also a Redis lock named by the output (redis-py's `Lock`, the
  same renewal and takeover rules on the Redis server's clock), so machines that share nothing else agree.

Fencing. A lease can be lost without the holder knowing: its process paused (VM suspend, a long GC, a
stalled network) past the lease's life, and another run took over. So before each request is sent and
before each write that replaces something in the output, the run checks the age of its last successful
renewal on a clock that keeps counting while the process is paused (CLOCK_BOOTTIME where there is one): past
the safe margin (20 s of the 30 s lease) it sends nothing until a renewal proves the lease is still its own
(a conditional write on the version it holds, which fails if anyone else wrote it). A renewal refused by
that condition, or failing for anything but a clear transient error, means the output was taken over: the
run stops admitting at once, lets its requests in flight finish and saves them (as new part objects, which
cannot clobber anything), and exits 2. The holder is a random run id, not a host and pid (containers often
share a hostname; pids are reused).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from ..engine.errors import OutputLost

__all__ = [
    "LOCK_FILE",
    "OutputDirectoryLocked",
    "OutputHold",
    "OutputTakenOver",
    "hold_output_directory",
    "hold_output_location",
]

logger = logging.getLogger(__name__)

LOCK_FILE = ".prefect-anthropic.lock"
_HOLDER_FILE = ".prefect-anthropic.lock.json"
LEASE_FILE = ".prefect-anthropic.lease"

#: A lease (object or Redis lock) not renewed for this long, by the store's clock, may be taken over. Every
#: run on one output must agree on it: change it (PREFECT_ANTHROPIC_LEASE_TTL_S) only for tests.
LEASE_TTL_S = float(os.environ.get("PREFECT_ANTHROPIC_LEASE_TTL_S") or 30.0)
#: Renewals are attempted this often; after a failed one, sooner.
RENEW_EVERY_S = LEASE_TTL_S / 3
RETRY_EVERY_S = 2.0
#: The hold is proven only this long after the start of the last successful renewal: the rest of the lease's
#: life is the margin for a request or a write already on its way when the process was paused.
SAFE_FOR_S = LEASE_TTL_S - RENEW_EVERY_S


class OutputDirectoryLocked(RuntimeError):
    """Another run holds the output: nothing is sent."""


class OutputTakenOver(OutputLost, OutputDirectoryLocked):
    """This run lost its output to another run (or could not prove it still held it): it stopped sending."""


def _clock() -> float:
    """Seconds on a clock that counts while the process is paused and while the machine is suspended."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic()


def _process_identity(pid: int) -> dict[str, Any]:
    """What tells this process apart from any other, on this machine or another: a boot of a kernel, a pid
    namespace (containers), a pid and its start time (pids are reused)."""
    identity: dict[str, Any] = {"host": socket.gethostname(), "pid": pid}
    with contextlib.suppress(OSError):
        identity["boot_id"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        identity["pid_ns"] = os.stat("/proc/self/ns/pid").st_ino
    started = _process_start_ticks(pid)
    if started is not None:
        identity["pid_start"] = started
    return identity


def _process_start_ticks(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    return None


def _holder_dead_here(holder: dict[str, Any]) -> bool:
    """Whether the holder was a process of this very kernel and pid namespace that no longer runs: then its
    lease need not be waited out. Anything less certain (another machine, another container) waits."""
    here = _process_identity(os.getpid())
    if not holder.get("boot_id") or holder.get("boot_id") != here.get("boot_id"):
        return False
    if holder.get("pid_ns") != here.get("pid_ns") or "pid_start" not in holder:
        return False
    return _process_start_ticks(int(holder["pid"])) != holder["pid_start"]


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "a run that has not written its name yet"
    return (
        f"run {holder.get('run_id', '?')[:12]}, host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
        f"started {holder.get('started_at', '?')}"
    )


def _in_use(location: str, holder: dict[str, Any] | None, where: str = "another run") -> OutputDirectoryLocked:
    return OutputDirectoryLocked(
        f"the output {location} is in use by {where} ({_describe(holder)}); nothing was sent. Wait for that run "
        "to finish (or stop it), then run again: it resumes."
    )


class OutputHold:
    """A run's hold on its output: who holds it (a random run id) and whether the hold is still proven.

    `check()` (sync, for writes) and `ensure()` (async, before each request is sent) pass while the last
    successful renewal is recent enough; past that they prove the hold again with a renewal, and raise
    OutputTakenOver when it is lost. A hold with nothing to renew (an OS file lock) always passes.
    """

    def __init__(self, location: str, run_id: str | None = None) -> None:
        self.location = location
        self.run_id = run_id or uuid.uuid4().hex
        self.started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._renewals: list[Callable[[], float | None]] = []
        self._renewing: list[threading.Lock] = []
        self._renewed_at: dict[int, float] = {}
        self._lost: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def holder_body(self) -> bytes:
        """The lease's content: who holds it, and a nonce of this write. Every write is new bytes, so its version
        is new too (an S3 ETag is the content's MD5: a renewal of the same bytes would keep it, and a run
        taking over on that version would not be refused)."""
        return json.dumps(
            {
                "run_id": self.run_id,
                "started_at": self.started_at,
                "write": uuid.uuid4().hex,
                **_process_identity(os.getpid()),
            }
        ).encode()

    @property
    def lost(self) -> str | None:
        """Why the hold is lost (None while it is held)."""
        return self._lost

    def _lose(self, why: str) -> None:
        with self._lock:
            if self._lost is None:
                self._lost = why
                logger.error("This run no longer holds %s: %s. It sends nothing more.", self.location, why)

    def _error(self) -> OutputTakenOver:
        return OutputTakenOver(
            0,
            "output_taken_over",
            f"this run lost its hold on {self.location} ({self._lost}); it sent nothing more and saved what was "
            "in flight. Another run may be writing this output now: check it, then run again to resume",
        )

    # -- renewal --------------------------------------------------------------------------------------------

    def add_renewal(self, renew: Callable[[], float | None]) -> None:
        """Renew one lease in a background thread. `renew` raises OutputTakenOver when the lease is lost,
        anything else for a transient failure (retried; the hold becomes unproven when it lasts). It returns
        when the lease's new term began on `_clock()` if that was before the call (an earlier write, whose
        reply was lost, is found to have landed), else None."""
        index = len(self._renewals)
        self._renewals.append(renew)
        self._renewing.append(threading.Lock())
        self._renewed_at[index] = _clock()
        thread = threading.Thread(target=self._keep, args=(index,), name="prefect-anthropic-lease", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _renew(self, index: int, *, only_if_overdue: bool = False) -> bool:
        """One renewal of lease `index`: True when it succeeded (the lease is this run's for another term)."""
        with self._renewing[index]:  # one renewal of a lease at a time: each conditions on the last's version
            if only_if_overdue and self._lost is None and index not in self._overdue():
                return True  # another caller renewed it while this one waited
            return self._renew_now(index)

    def _renew_now(self, index: int) -> bool:
        if self._lost is not None:
            return False
        started = _clock()
        try:
            began = self._renewals[index]()
        except OutputTakenOver as error:
            self._lose(error.message)
            return False
        except Exception as exc:
            if not _transient(exc):
                self._lose(f"its lease could not be renewed: {type(exc).__name__}: {exc}")
                return False
            logger.warning("Could not renew the lease on %s (%s); trying again", self.location, exc)
            return False
        with self._lock:
            self._renewed_at[index] = max(self._renewed_at[index], started if began is None else began)
        return True

    def _keep(self, index: int) -> None:
        wait = RENEW_EVERY_S
        while not self._stop.wait(wait):
            wait = RENEW_EVERY_S if self._renew(index) else RETRY_EVERY_S
            if self._lost is not None:
                return

    def _overdue(self) -> list[int]:
        now = _clock()
        return [index for index, at in self._renewed_at.items() if now - at > SAFE_FOR_S]

    # -- fencing --------------------------------------------------------------------------------------------

    def _prove(self) -> bool:
        """Renew every overdue lease now: whether the hold is proven (False also when it is lost)."""
        return all(self._renew(index, only_if_overdue=True) for index in self._overdue()) and self._lost is None

    def check(self) -> None:
        """Raise OutputTakenOver unless this run provably holds its output now (renewing first if overdue)."""
        proven = self._lost is None and self._prove()
        if self._lost is not None:
            raise self._error()
        if not proven:
            raise OutputTakenOver(
                0,
                "output_unproven",
                f"this run cannot prove it still holds {self.location} (its lease could not be renewed for "
                f"{SAFE_FOR_S:.0f} s); nothing more was written. Run again to resume",
            )

    async def ensure(self, give_up_after_s: float = 120.0) -> None:
        """Before a request is sent: pass at once while the hold is proven; while it is not (a renewal
        failing for a transient reason, or the process was paused), wait for a renewal to prove it, and raise
        OutputTakenOver when the lease is lost (or cannot be proven for `give_up_after_s`)."""
        if self._lost is None and not self._overdue():
            return
        import asyncio

        deadline = _clock() + give_up_after_s
        while True:
            proven = self._lost is None and await asyncio.to_thread(self._prove)
            if self._lost is not None:
                raise self._error()
            if proven:
                return
            if _clock() > deadline:
                self._lose(f"its lease could not be renewed for {give_up_after_s:.0f} s")
                raise self._error()
            await asyncio.sleep(RETRY_EVERY_S)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    @contextmanager
    def renewed(self, renew: Callable[[], float | None]) -> Iterator[None]:
        """`renew` kept running for the block (see `add_renewal`); every renewal stops at its end."""
        self.add_renewal(renew)
        try:
            yield
        finally:
            self.close()


#: Words in the class names of the storage and Redis libraries' errors for "could not reach it in time": botocore's
#: EndpointConnectionError, aiohttp's ClientOSError and ServerDisconnectedError, Azure's ServiceRequestError...
_TRANSIENT_NAMES = (
    "Connection", "Timeout", "Endpoint", "ServiceUnavailable", "Throttl", "ServiceRequest", "ServiceResponse",
    "Disconnect", "ClientOSError",
)  # fmt: skip


def _transient(exc: BaseException) -> bool:
    """A failure that says nothing about who holds the lease: the store or Redis could not be reached, timed
    out, or answered a server error."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    name = type(exc).__name__
    if any(word in name for word in _TRANSIENT_NAMES):
        return True
    if isinstance(exc, OSError) and exc.errno in (
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EPIPE,
        errno.EAGAIN,
    ):
        return True
    status = _status_of(exc)
    if status is not None:
        return status >= 500 or status in (408, 429)
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and _transient(cause)


def _status_of(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if isinstance(status, int) else None
    for attribute in ("status", "status_code", "code"):
        value = getattr(exc, attribute, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    return None


# -- the holds ------------------------------------------------------------------------------------------------


@contextmanager
def _hold_file_lock(directory: Path, hold: OutputHold) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(directory / LOCK_FILE, timeout=0, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        holder = None
        with contextlib.suppress(OSError, ValueError):
            holder = json.loads((directory / _HOLDER_FILE).read_text())
        raise _in_use(str(directory), holder) from None
    holder_file = directory / _HOLDER_FILE
    try:
        holder_file.write_bytes(hold.holder_body())
        yield
    finally:
        holder_file.unlink(missing_ok=True)
        lock.release()


@contextmanager
def _hold_in_redis(location: Path | str, limiter_url: str, hold: OutputHold | None = None) -> Iterator[None]:
    import redis
    from redis.exceptions import LockError, LockNotOwnedError

    from ..engine.shared_limiter import KEY_PREFIX, SharedLimiterUnavailable

    hold = hold or OutputHold(str(location))
    path = str(location.resolve()) if isinstance(location, Path) else location
    name = f"{KEY_PREFIX}:directory-lock:{hashlib.sha256(path.encode()).hexdigest()[:32]}"
    client = redis.Redis.from_url(limiter_url, socket_timeout=5, socket_connect_timeout=5)
    # The lock's token is the run id: whoever holds the key is known, and only this run can extend it.
    lock = client.lock(name, timeout=LEASE_TTL_S, blocking=False, thread_local=False)
    try:
        if not lock.acquire(token=hold.run_id):
            raw = client.get(name + ":holder")
            holder = json.loads(raw) if raw else None
            raise _in_use(str(location), holder, "a run on another machine")
        client.set(name + ":holder", hold.holder_body(), ex=int(LEASE_TTL_S))
    except redis.RedisError as exc:
        client.close()
        raise SharedLimiterUnavailable(limiter_url, exc) from exc

    def renew() -> None:
        try:
            lock.reacquire()
        except (LockNotOwnedError, LockError) as exc:
            # Gone (Redis restarted without its data, or the key expired unclaimed): take it again if still free.
            # Held by another token: another run has it.
            if client.get(name) is not None or not lock.acquire(token=hold.run_id):
                raise OutputTakenOver(0, "output_taken_over", f"its Redis lock is no longer its own ({exc})") from exc
        client.set(name + ":holder", hold.holder_body(), ex=int(LEASE_TTL_S))
        return None

    try:
        with hold.renewed(renew):
            yield
    finally:
        with contextlib.suppress(redis.RedisError, LockError):
            lock.release()
            client.delete(name + ":holder")
        client.close()


@contextmanager
def _hold_lease(storage: Any, location: str, hold: OutputHold) -> Iterator[None]:
    from .leases import LeaseConflict, LeaseExists, lease_object

    lease = lease_object(storage, location.rstrip("/") + "/" + LEASE_FILE)
    if lease is None:
        protocol = location.split("://", 1)[0]
        raise OutputDirectoryLocked(
            f"the output {location}: {protocol}:// cannot write conditionally, so two runs on it could not be kept "
            "apart; give --limiter-url (a Redis lock) or use s3://, gs://, az:// or a local directory"
        )
    body = hold.holder_body()
    try:
        token = lease.create(body)
    except LeaseExists:
        token = _take_over(lease, location, body)
    current = [token]
    #: Writes whose reply was lost (a timeout, a cut connection): (body, when it was started). One of them may
    #: have landed, which the next renewal's condition then refuses: that is still this run's lease.
    unanswered: list[tuple[bytes, float]] = []

    def renew() -> float | None:
        body, started = hold.holder_body(), _clock()
        try:
            current[0] = lease.replace(body, current[0])
        except LeaseConflict as exc:
            state = None
            with contextlib.suppress(Exception):
                state = lease.read()
            landed = [at for sent, at in unanswered if state is not None and state.body == sent]
            if state is not None and landed:
                current[0] = state.token
                unanswered.clear()
                return landed[0]  # the term began with that write, not with this one
            holder = _parse(state.body) if state is not None else None
            raise OutputTakenOver(0, "output_taken_over", f"its lease was taken over by {_describe(holder)}") from exc
        except Exception:
            unanswered.append((body, started))
            raise
        unanswered.clear()
        return None

    try:
        with hold.renewed(renew):
            yield
    finally:
        if hold.lost is None:
            with contextlib.suppress(Exception):
                lease.delete(current[0])


def _parse(body: bytes) -> dict[str, Any] | None:
    with contextlib.suppress(ValueError):
        holder = json.loads(body)
        return holder if isinstance(holder, dict) else None
    return None


def _take_over(lease: Any, location: str, body: bytes) -> str:
    """Take the lease from a holder that stopped renewing it (by the store's clock), or from a process of this
    machine that is gone; else the output is in use."""
    from .leases import LeaseConflict, LeaseExists

    state = lease.read()
    if state is None:  # released meanwhile
        try:
            return str(lease.create(body))
        except LeaseExists:
            raise _just_taken(location) from None
    holder = _parse(state.body)
    if state.age_s < LEASE_TTL_S and not (holder and _holder_dead_here(holder)):
        raise _in_use(location, holder)
    try:
        token = str(lease.replace(body, state.token))
    except LeaseConflict:
        raise _just_taken(location) from None
    logger.warning("Took over the output %s from %s, which stopped renewing its lease.", location, _describe(holder))
    return token


def _just_taken(location: str) -> OutputDirectoryLocked:
    return OutputDirectoryLocked(
        f"the output {location} was just taken by another run; nothing was sent. Wait for that run to finish "
        "(or stop it), then run again: it resumes."
    )


@contextmanager
def hold_output_location(
    location: str, storage: Any, limiter_url: str | None = None, *, hold: OutputHold | None = None
) -> Iterator[OutputHold]:
    """Hold an output directory or URL for the duration of the block (yielding the hold, whose `check` and
    `ensure` fence writes and requests), or raise OutputDirectoryLocked at once."""
    from ..storage import is_url, local_path

    hold = hold or OutputHold(location)
    with contextlib.ExitStack() as stack:
        if limiter_url:
            target: Path | str = local_path(location).absolute() if not is_url(location) else location
            stack.enter_context(_hold_in_redis(target, limiter_url, hold))
        if not is_url(location):
            stack.enter_context(_hold_file_lock(local_path(location), hold))
        elif not limiter_url or _has_lease(storage, location):
            stack.enter_context(_hold_lease(storage, location, hold))
        yield hold


def _has_lease(storage: Any, location: str) -> bool:
    from .leases import lease_object

    return lease_object(storage, location.rstrip("/") + "/" + LEASE_FILE) is not None


@contextmanager
def hold_output_directory(output_dir: str | os.PathLike[str], limiter_url: str | None = None) -> Iterator[None]:
    """Hold a local output directory for the duration of the block, or raise OutputDirectoryLocked at once."""
    with hold_output_location(str(output_dir), None, limiter_url):
        yield
