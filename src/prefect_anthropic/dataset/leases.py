"""Lease objects: one small object on a store that only one run can create, and that only the run holding its
current version can replace or delete: the primitive run_lock builds its lock and fence on, for every store
that can write conditionally.

- S3 (s3fs): `If-None-Match: *` to create, `If-Match: ETag` to replace and delete.
- GCS (gcsfs): `ifGenerationMatch=0` to create, `ifGenerationMatch=generation` to replace and delete (through a
  release mark: see _GCSLease.delete).
- Azure Blob (adlfs): `If-None-Match: *` to create, `If-Match: ETag` to replace and delete.
- memory:// (one process): the same rules under a lock.

Every other store (hf://, ...) has no conditional write here: `lease_object` answers None.

A write refused because the object is not in the state we conditioned on raises LeaseExists (create) or
LeaseConflict (replace, delete); every other error (connection refused, timeouts, 5xx, credentials) propagates
as the storage library raised it, so the caller can tell "someone else holds it" from "the store is not
answering". The client libraries retry transient failures themselves, for up to 85 s (Azure's defaults) on an
unreachable store: each call here is cut at CALL_TIMEOUT_S (raising fsspec's FSTimeoutError, an
asyncio.TimeoutError), so that a renewal answers in time to act on. A retried (or cut) write whose first attempt
landed but whose reply was lost is then refused by its own precondition. To tell that apart from a real loss,
a refused write reads the object back: when it holds exactly the body we wrote, the write was ours and
succeeds. So a body must name its writer (a random run id): two holders must never write the same bytes.
"""

from __future__ import annotations

import email.utils
import json
import threading
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

if TYPE_CHECKING:
    from ..storage import Storage

__all__ = ["CALL_TIMEOUT_S", "LeaseConflict", "LeaseExists", "LeaseObject", "LeaseState", "lease_object"]

#: The longest one call to the store may take, its client's own retries included.
CALL_TIMEOUT_S = 10.0


class LeaseExists(Exception):
    """create refused: the lease object already exists."""


class LeaseConflict(Exception):
    """replace/delete refused: the object is not the version we hold (another run wrote it)."""


@dataclass(frozen=True)
class LeaseState:
    body: bytes  # the holder's JSON
    token: str  # the version to condition on: S3/Azure ETag, GCS generation
    age_s: float  # seconds since it was last written, by the STORE's clock (server Date/now - last-modified)


class LeaseObject(Protocol):
    location: str

    def create(self, body: bytes) -> str:
        """Write `body` only if the object is absent; its token. Raises LeaseExists."""
        ...

    def read(self) -> LeaseState | None:
        """The object now, or None when absent."""
        ...

    def replace(self, body: bytes, token: str) -> str:
        """Write `body` only if the object is still version `token`; the new token. Raises LeaseConflict."""
        ...

    def delete(self, token: str) -> None:
        """Delete the object only if it is still version `token` (already gone: fine). Raises LeaseConflict."""
        ...


def lease_object(storage: Storage, location: str) -> LeaseObject | None:
    """The lease object `location` (a URL) on its store, or None when the store cannot write conditionally."""
    if "://" not in location:
        return None
    protocol = location.split("://", 1)[0].lower()
    if protocol not in ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"):
        return None
    fs, path = storage.filesystem(location)
    # The protocol may be served by another implementation than the one whose API we speak: check it is ours.
    if protocol == "memory" and isinstance(getattr(fs, "store", None), dict):
        return _MemoryLease(fs, path, location)
    if protocol in ("s3", "s3a") and hasattr(fs, "call_s3"):
        return _S3Lease(fs, path, location)
    if protocol in ("gs", "gcs") and hasattr(fs, "_call") and hasattr(fs, "_location"):
        return _GCSLease(fs, path, location)
    if protocol in ("az", "abfs", "abfss") and hasattr(fs, "service_client"):
        return _AzureLease(fs, path, location)
    return None


def _age(now: datetime | None, written: datetime) -> float:
    """Seconds from `written` to the store's `now` (its reply's Date; this machine's clock if it sent none).
    Both are to the second on S3 and Azure: never below zero."""
    if written.tzinfo is None:
        written = written.replace(tzinfo=timezone.utc)
    return max(0.0, ((now or datetime.now(timezone.utc)) - written).total_seconds())


def _http_date(value: str | None) -> datetime | None:
    return email.utils.parsedate_to_datetime(value) if value else None


def _sync(fs: Any, operation: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a coroutine function on the filesystem's event loop, cut (cancelled) after CALL_TIMEOUT_S."""
    from fsspec.asyn import sync

    return sync(fs.loop, operation, *args, timeout=CALL_TIMEOUT_S, **kwargs)


class _Lease:
    location: str

    def read(self) -> LeaseState | None:
        raise NotImplementedError

    def _refused(self, exc: BaseException) -> bool:
        """Whether the store refused a conditional request because the object is not in the state it named."""
        raise NotImplementedError

    def _gone(self, exc: BaseException) -> bool:
        """Whether the store answered that the object is not there."""
        return isinstance(exc, FileNotFoundError)

    def _conditional_write(self, body: bytes, write: Callable[[], str], *, replacing: bool) -> str:
        """The token of `write()`, a conditional write of `body`. Refused (when `replacing`, also by the object
        being gone: not the version we hold either): the token all the same if the write landed after all (see
        `_ours`), else LeaseConflict when `replacing`, LeaseExists when creating."""
        try:
            return write()
        except Exception as exc:
            if not (self._refused(exc) or (replacing and self._gone(exc))):
                raise
            refusal = exc
        return self._ours_or(body, self._conflict(refusal) if replacing else self._exists(refusal))

    def _conditional_delete(self, delete: Callable[[], object]) -> None:
        """Run `delete()`, a conditional delete: already gone is fine; refused, see `_refused_delete`."""
        try:
            delete()
        except Exception as exc:
            if self._gone(exc):
                return
            if not self._refused(exc):
                raise
            self._refused_delete(exc)

    def _ours(self, body: bytes) -> str | None:
        """After a refused write: the object's token when it holds exactly `body` (our own write, landed by an
        earlier attempt of a request the client retried after losing its reply), else None."""
        state = self.read()
        return state.token if state is not None and state.body == body else None

    def _ours_or(self, body: bytes, refused: Exception) -> str:
        """After a refused write of `body`: its token when it landed after all (see `_ours`), else `refused`."""
        token = self._ours(body)
        if token is None:
            raise refused
        return token

    def _exists(self, refusal: Exception) -> LeaseExists:
        error = LeaseExists(f"the lease {self.location} already exists")
        error.__cause__ = refusal
        return error

    def _refused_delete(self, refusal: Exception) -> None:
        """A conditional delete refused: fine when the object is gone (HTTP answers 412, not 404, to If-Match on
        nothing), else the version is another run's."""
        if self.read() is not None:
            raise self._conflict(refusal)

    def _conflict(self, refusal: Exception) -> LeaseConflict:
        error = LeaseConflict(f"the lease {self.location} is no longer the version this run holds")
        error.__cause__ = refusal
        return error


# -- S3 -------------------------------------------------------------------------------------------------


def _s3_refused(exc: BaseException) -> bool:
    """Whether an s3fs/botocore error is a precondition refusal: 412 PreconditionFailed, or 409
    ConditionalRequestConflict (a concurrent conditional write won). s3fs translates both into OSErrors
    (FileExistsError for If-None-Match, a plain OSError(EINVAL) for If-Match) with botocore's ClientError as
    the cause, which says which it was."""
    for error in (exc, exc.__cause__):
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412
    return isinstance(exc, FileExistsError)


class _S3Lease(_Lease):
    def __init__(self, fs: Any, path: str, location: str) -> None:
        self.fs = fs
        self.location = location
        self.bucket, _, self.key = path.partition("/")

    def _put(self, body: bytes, **condition: str) -> str:
        reply = _sync(
            self.fs,
            self.fs._call_s3,
            "put_object",
            Bucket=self.bucket,
            Key=self.key,
            Body=body,
            ContentType="application/json",
            **condition,
        )
        return str(reply["ETag"])

    def _refused(self, exc: BaseException) -> bool:
        return _s3_refused(exc)

    def create(self, body: bytes) -> str:
        return self._conditional_write(body, lambda: self._put(body, IfNoneMatch="*"), replacing=False)

    def read(self) -> LeaseState | None:
        async def get() -> tuple[dict[str, Any], bytes]:
            # One GET: the body, its ETag and its date belong to one version.
            reply = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            try:
                return reply, await reply["Body"].read()
            finally:
                reply["Body"].close()

        try:
            reply, body = _sync(self.fs, get)
        except FileNotFoundError:
            return None
        now = _http_date(reply["ResponseMetadata"]["HTTPHeaders"].get("date"))
        return LeaseState(body, str(reply["ETag"]), _age(now, reply["LastModified"]))

    def replace(self, body: bytes, token: str) -> str:
        return self._conditional_write(body, lambda: self._put(body, IfMatch=token), replacing=True)

    def delete(self, token: str) -> None:
        self._conditional_delete(
            lambda: _sync(self.fs, self.fs._call_s3, "delete_object", Bucket=self.bucket, Key=self.key, IfMatch=token)
        )


# -- GCS ------------------------------------------------------------------------------------------------

#: What a released GCS lease holds for the instant between its two steps (see _GCSLease.delete): absent to read().
_RELEASED = b'{"released": true}'


def _gcs_refused(exc: BaseException) -> bool:
    """gcsfs raises FileExistsError for 412 Precondition Failed (and for nothing else)."""
    return isinstance(exc, FileExistsError) or getattr(exc, "code", None) == 412


def _rfc3339(text: str) -> datetime:
    """GCS's `updated` (UTC, 'Z', 0 to 9 fraction digits), which Python 3.10's fromisoformat cannot read."""
    whole, _, fraction = text.rstrip("Z").partition(".")
    moment = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    return moment.replace(microsecond=int((fraction + "000000")[:6]))


class _GCSLease(_Lease):
    """By the JSON API through gcsfs's own session and credentials (`_call`). Uploads are multipart: the form
    whose ifGenerationMatch every GCS emulator honours too."""

    def __init__(self, fs: Any, path: str, location: str) -> None:
        self.fs = fs
        self.location = location
        self.bucket, _, self.key = path.partition("/")

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        return _sync(self.fs, self.fs._call, *args, **kwargs)

    def _refused(self, exc: BaseException) -> bool:
        return _gcs_refused(exc)

    def _upload(self, body: bytes, generation: str) -> str:
        boundary = uuid.uuid4().hex
        metadata = json.dumps({"name": self.key, "contentType": "application/json"}).encode()
        data = b"".join(
            [
                f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n".encode(),
                metadata,
                f"\r\n--{boundary}\r\nContent-Type: application/json\r\n\r\n".encode(),
                body,
                f"\r\n--{boundary}--\r\n".encode(),
            ]
        )
        reply = self._call(
            "POST",
            f"{self.fs._location}/upload/storage/v1/b/{quote(self.bucket, safe='')}/o",
            uploadType="multipart",
            ifGenerationMatch=generation,
            headers={"Content-Type": f'multipart/related; boundary="{boundary}"'},
            data=data,
            json_out=True,
        )
        return str(reply["generation"])

    def _read_raw(self) -> LeaseState | None:
        """The object as stored, a released one included."""
        try:
            headers, body = self._call("GET", "b/{}/o/{}", self.bucket, self.key, alt="media")
        except FileNotFoundError:
            return None
        generation, modified = headers.get("X-Goog-Generation"), headers.get("Last-Modified")
        if generation is None or modified is None:  # a store that does not send them: ask for the metadata
            try:
                headers, text = self._call("GET", "b/{}/o/{}", self.bucket, self.key)
                metadata = json.loads(text)
                generation, written = str(metadata["generation"]), _rfc3339(metadata["updated"])
                _, body = self._call("GET", "b/{}/o/{}", self.bucket, self.key, alt="media", generation=generation)
            except FileNotFoundError:  # replaced or deleted between the two: read again
                return self._read_raw()
        else:
            written = email.utils.parsedate_to_datetime(modified)
        return LeaseState(bytes(body), str(generation), _age(_http_date(headers.get("Date")), written))

    def read(self) -> LeaseState | None:
        state = self._read_raw()
        return None if state is None or state.body == _RELEASED else state

    def _ours(self, body: bytes) -> str | None:
        state = self._read_raw()
        return state.token if state is not None and state.body == body else None

    def create(self, body: bytes) -> str:
        generation = "0"  # absent
        for _ in range(3):
            try:
                return self._upload(body, generation)
            except Exception as exc:
                if not _gcs_refused(exc):
                    raise
                refusal = exc
            state = self._read_raw()
            if state is not None and state.body == body:
                return state.token
            if state is not None and state.body != _RELEASED:
                break
            # Deleted since, or released by its holder a moment ago: take it, conditionally on that state.
            generation = "0" if state is None else state.token
        raise self._exists(refusal)

    def replace(self, body: bytes, token: str) -> str:
        return self._conditional_write(body, lambda: self._upload(body, token), replacing=True)

    def delete(self, token: str) -> None:
        # Two steps, because fake-gcs-server (the GCS emulator the tests use) ignores ifGenerationMatch on
        # DELETE: first a conditional overwrite with a release mark (refused unless we still hold the lease:
        # this is the step that fences), then a DELETE conditional on that mark's generation (GCS honours it,
        # so it never removes a lease another run took in between).
        try:
            released = self._upload(_RELEASED, token)
        except FileNotFoundError:
            return
        except Exception as exc:
            if not _gcs_refused(exc):
                raise
            state = self._read_raw()
            if state is None or state.body == _RELEASED:
                return
            raise self._conflict(exc) from exc
        try:
            self._call("DELETE", "b/{}/o/{}", self.bucket, self.key, ifGenerationMatch=released)
        except Exception as exc:
            if not (isinstance(exc, FileNotFoundError) or _gcs_refused(exc)):
                raise


# -- Azure Blob -----------------------------------------------------------------------------------------


def _azure_refused(exc: BaseException) -> bool:
    """409 BlobAlreadyExists (If-None-Match: *) or 412 ConditionNotMet (If-Match): not any other 409."""
    from azure.core.exceptions import HttpResponseError

    if not isinstance(exc, HttpResponseError):
        return False
    return exc.status_code == 412 or getattr(exc, "error_code", None) in ("BlobAlreadyExists", "ConditionNotMet")


class _AzureLease(_Lease):
    """Through adlfs's own async BlobServiceClient (its credentials, its event loop)."""

    def __init__(self, fs: Any, path: str, location: str) -> None:
        self.fs = fs
        self.location = location
        self.container, self.blob = fs.split_path(path)[:2]

    def _run(self, operation: Any) -> Any:
        return _sync(self.fs, operation)

    def _refused(self, exc: BaseException) -> bool:
        return _azure_refused(exc)

    def _gone(self, exc: BaseException) -> bool:
        from azure.core.exceptions import ResourceNotFoundError

        return isinstance(exc, ResourceNotFoundError)

    def _upload(self, body: bytes, **conditions: Any) -> str:
        from azure.storage.blob import ContentSettings

        async def upload() -> str:
            async with self.fs.service_client.get_blob_client(self.container, self.blob) as client:
                reply = await client.upload_blob(
                    body, content_settings=ContentSettings(content_type="application/json"), **conditions
                )
            return str(reply["etag"])

        return str(self._run(upload))

    def create(self, body: bytes) -> str:
        # overwrite=False: If-None-Match: *
        return self._conditional_write(body, lambda: self._upload(body, overwrite=False), replacing=False)

    def read(self) -> LeaseState | None:
        from azure.core.exceptions import ResourceNotFoundError

        dates: list[str | None] = []

        def record_date(response: Any) -> None:
            dates.append(response.http_response.headers.get("Date"))

        async def download() -> tuple[bytes, Any]:
            async with self.fs.service_client.get_blob_client(self.container, self.blob) as client:
                stream = await client.download_blob(raw_response_hook=record_date)
                return await stream.readall(), stream.properties

        try:
            body, properties = self._run(download)
        except ResourceNotFoundError:
            return None
        now = _http_date(dates[-1] if dates else None)
        return LeaseState(bytes(body), str(properties.etag), _age(now, properties.last_modified))

    def replace(self, body: bytes, token: str) -> str:
        from azure.core import MatchConditions

        def upload() -> str:
            return self._upload(body, overwrite=True, etag=token, match_condition=MatchConditions.IfNotModified)

        return self._conditional_write(body, upload, replacing=True)

    def delete(self, token: str) -> None:
        from azure.core import MatchConditions

        async def delete() -> None:
            async with self.fs.service_client.get_blob_client(self.container, self.blob) as client:
                await client.delete_blob(etag=token, match_condition=MatchConditions.IfNotModified)

        self._conditional_delete(lambda: self._run(delete))


# -- memory:// ------------------------------------------------------------------------------------------

#: memory:// lives in one process: its conditional writes are a lock around fsspec's MemoryFileSystem store.
_MEMORY_LOCK = threading.Lock()
#: The token of each stored file object (a file written by other means than a lease gets one when first read).
_MEMORY_TOKENS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


class _MemoryLease(_Lease):
    """The lease is a file of the memory filesystem itself, so it lives and vanishes with the rest of the
    output (a test that clears the store clears it too); its version is the identity of the stored file."""

    def __init__(self, fs: Any, path: str, location: str) -> None:
        self.fs = fs
        self.path = path
        self.location = location

    def _token(self) -> str | None:
        stored = self.fs.store.get(self.path)
        if stored is None:
            return None
        return _MEMORY_TOKENS.setdefault(stored, uuid.uuid4().hex)

    def _write(self, body: bytes) -> str:
        self.fs.pipe_file(self.path, body)
        token = uuid.uuid4().hex
        _MEMORY_TOKENS[self.fs.store[self.path]] = token
        return token

    def create(self, body: bytes) -> str:
        with _MEMORY_LOCK:
            if self.path in self.fs.store:
                raise LeaseExists(f"the lease {self.location} already exists")
            return self._write(body)

    def read(self) -> LeaseState | None:
        with _MEMORY_LOCK:
            stored = self.fs.store.get(self.path)
            token = self._token()
            if stored is None or token is None:
                return None
            return LeaseState(bytes(stored.getbuffer()), token, _age(None, stored.modified))

    def replace(self, body: bytes, token: str) -> str:
        with _MEMORY_LOCK:
            if self._token() != token:
                raise LeaseConflict(f"the lease {self.location} is no longer the version this run holds")
            return self._write(body)

    def delete(self, token: str) -> None:
        with _MEMORY_LOCK:
            current = self._token()
            if current is None:
                return
            if current != token:
                raise LeaseConflict(f"the lease {self.location} is no longer the version this run holds")
            del self.fs.store[self.path]
