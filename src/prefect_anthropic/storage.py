"""Where inputs and outputs live: a local path, or any fsspec URL (s3://, gs://, az://, hf://, memory://,
file://).

Prefect work pools run each flow run in a container whose disk vanishes; what they share is a bucket. So
every path the package reads or writes may be a URL. Credentials are found the way each filesystem library
finds them (environment, `AWS_ENDPOINT_URL`, instance roles), or come from `--storage-options JSON`
(PREFECT_ANTHROPIC_STORAGE_OPTIONS, never a flow parameter: it may hold secrets) or a Prefect block by name
(`--storage-block`, e.g. prefect-aws's S3Bucket, read as a block document: prefect-aws need not be
installed). A URL whose filesystem is not installed is a clear error naming the extra to install.

Files are written so that a reader never sees half of one: locally under a temporary name renamed when
complete; on object storage as one object, which becomes visible only when its upload completes (and is
abandoned, not committed, when the writing fails).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = ["STORAGE_OPTIONS_ENV", "Storage", "StorageError", "is_url", "join"]

STORAGE_OPTIONS_ENV = "PREFECT_ANTHROPIC_STORAGE_OPTIONS"
#: The package extra that installs each protocol's filesystem.
_EXTRAS = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gcs",
    "gcs": "gcs",
    "az": "azure",
    "abfs": "azure",
    "abfss": "azure",
    "adl": "azure",
    "hf": "hf",
}


class StorageError(ValueError):
    """A location that cannot be used: its filesystem is not installed, or it cannot be reached."""


def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether a location names a filesystem other than the local one (file:// counts as local)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def join(base: str, *parts: str) -> str:
    """`base/part/...` for a path or a URL."""
    if is_url(base) or str(base).startswith("file://"):
        return "/".join([str(base).rstrip("/"), *(part.strip("/") for part in parts)])
    return str(Path(base, *parts))


def local_path(location: str | os.PathLike[str]) -> Path:
    text = str(location)
    return Path(text[len("file://") :] if text.startswith("file://") else text)


@dataclass
class Storage:
    """How to reach locations: the filesystem of each URL, with the storage options in force."""

    options: dict[str, Any] = field(default_factory=dict, repr=False)  # keys and secrets: never in a repr or log
    _filesystems: dict[str, Any] = field(default_factory=dict, repr=False)
    #: Called before a write that replaces or removes what may be another run's (merged outputs, markers,
    #: summaries): raises when this run no longer holds its output (see run_lock). Writes of new immutable,
    #: uniquely named objects (`immutable=True`: parts of results and of spending journals) are not fenced: they
    #: cannot clobber anything, and they record requests already paid for.
    fence: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_environment(cls, block_options: dict[str, Any] | None = None) -> Storage:
        """Options from a block (if any), with PREFECT_ANTHROPIC_STORAGE_OPTIONS (JSON) over them."""
        options = dict(block_options or {})
        text = os.environ.get(STORAGE_OPTIONS_ENV)
        if text:
            try:
                given = json.loads(text)
            except json.JSONDecodeError as exc:
                raise StorageError(f"{STORAGE_OPTIONS_ENV} (--storage-options) is not JSON: {exc}") from None
            if not isinstance(given, dict):
                raise StorageError(f"{STORAGE_OPTIONS_ENV} (--storage-options) must be a JSON object")
            options.update(given)
        return cls(options)

    def filesystem(self, location: str) -> tuple[Any, str]:
        """(the fsspec filesystem, the path within it) of a URL or local path."""
        text = str(location)
        if not is_url(text):
            from fsspec.implementations.local import LocalFileSystem

            return LocalFileSystem(), str(local_path(text).absolute())
        protocol = text.split("://", 1)[0]
        fs = self._filesystems.get(protocol)
        if fs is None:
            import fsspec

            # Other processes (workers) write here too: never answer from a stale listing.
            options = {"use_listings_cache": False, **self.options}
            try:
                fs = fsspec.filesystem(protocol, **options)
            except (ImportError, ValueError) as exc:
                raise self._missing_filesystem_error(text, protocol, exc) from None
            self._filesystems[protocol] = fs
        return fs, fs._strip_protocol(text)

    @staticmethod
    def _missing_filesystem_error(location: str, protocol: str, cause: Exception) -> StorageError:
        extra = _EXTRAS.get(protocol)
        hint = f"pip install 'prefect-anthropic[{extra}]'" if extra else "install its fsspec implementation"
        return StorageError(f"{location}: no filesystem for {protocol}:// is installed ({hint}): {cause}")

    # -- reading ----------------------------------------------------------------------------------------

    def exists(self, location: str) -> bool:
        fs, path = self.filesystem(location)
        return bool(fs.exists(path))

    def open(self, location: str, mode: str = "rb") -> IO[Any]:
        fs, path = self.filesystem(location)
        if "r" in mode and not fs.exists(path):
            raise FileNotFoundError(f"not found: {location}")
        return fs.open(path, mode)

    def read_bytes(self, location: str) -> bytes:
        with self.open(location, "rb") as handle:
            return handle.read()

    def read_text(self, location: str) -> str:
        return self.read_bytes(location).decode("utf-8")

    def list(self, location: str, pattern: str = "*") -> list[str]:
        """Locations under `location` whose names match `pattern`, sorted (as URLs when it is one)."""
        fs, path = self.filesystem(location)
        found = sorted(fs.glob(f"{path.rstrip('/')}/{pattern}"))
        if not is_url(location):
            return found
        protocol = str(location).split("://", 1)[0]
        return [f"{protocol}://{name}" for name in found]

    # -- writing ----------------------------------------------------------------------------------------

    def makedirs(self, location: str) -> None:
        fs, path = self.filesystem(location)
        if not is_url(location):
            fs.makedirs(path, exist_ok=True)

    def _check_fence(self, immutable: bool) -> None:
        if self.fence is not None and not immutable:
            self.fence()

    @contextlib.contextmanager
    def atomic_writer(self, location: str, *, immutable: bool = False) -> Iterator[IO[bytes]]:
        """A file to write whole: nobody sees it until it is complete, and nothing of it if writing fails.
        Unless `immutable` (a new, uniquely named object), the run's fence is checked before it is committed."""
        if not is_url(location):
            target = local_path(location)
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
            try:
                with open(partial, "wb") as handle:
                    yield handle
                    handle.flush()
                    os.fsync(handle.fileno())
                self._check_fence(immutable)
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
            return
        fs, path = self.filesystem(location)
        handle = fs.open(path, "wb")
        try:
            yield handle
        except BaseException:
            with contextlib.suppress(Exception):
                handle.discard()  # an upload abandoned is never committed: readers see the old object or none
            raise
        try:
            self._check_fence(immutable)
        except BaseException:
            with contextlib.suppress(Exception):
                handle.discard()
            raise
        handle.close()

    def write_bytes(self, location: str, data: bytes, *, immutable: bool = False) -> None:
        with self.atomic_writer(location, immutable=immutable) as handle:
            handle.write(data)

    def write_text(self, location: str, text: str) -> None:
        self.write_bytes(location, text.encode("utf-8"))

    def remove(self, location: str) -> None:
        self._check_fence(False)
        fs, path = self.filesystem(location)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path)
