"""What a run is given: its configuration resolved at the edge (flags, blocks, the environment, the defaults).

Below this nothing reads a flag, a block or an environment variable: the data path and the engine take a
`RunSetup`. Blocks are read by `orchestration.edge.resolve_run`, which ends here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..settings import ClientSettings, RunOptions, api_key_from_env
from ..storage import Storage
from .auto_mode import parse_deadline

__all__ = ["RunSetup"]


@dataclass(frozen=True)
class RunSetup:
    """A run's settings, options, storage, API key and shared limiter's Redis URL, each resolved once."""

    settings: ClientSettings
    options: RunOptions
    storage: Storage
    api_key: str = field(repr=False)
    #: The shared limiter's (and the lock's) Redis, its password included: never log it.
    limiter_url: str | None = field(default=None, repr=False)

    @classmethod
    def resolve(
        cls,
        settings: ClientSettings | None = None,
        options: RunOptions | None = None,
        *,
        api_key: str | None = None,
        storage: Storage | None = None,
        storage_options: dict[str, Any] | None = None,
        limiter_url: str | None = None,
    ) -> RunSetup:
        """Given values first, then the environment (ANTHROPIC_API_KEY, the storage options, the limiter's
        URL and password), then the defaults. A block's values come in as given values; a `storage` given
        is used as it is (its options are its own)."""
        settings = settings if settings is not None else ClientSettings()
        return cls(
            settings=settings,
            options=options if options is not None else RunOptions(),
            storage=storage if storage is not None else Storage.from_environment(storage_options),
            api_key=api_key or api_key_from_env(),
            limiter_url=limiter_url or settings.redis_url,
        )

    def check(self) -> None:
        """Options that cannot go together, refused before anything is held or sent."""
        options = self.options
        if options.work_pool and options.mode != "realtime":
            raise ValueError("--work-pool runs shards in real-time mode only (batch mode needs no workers)")
        if options.mode == "auto":
            if not options.deadline:
                raise ValueError(
                    "--mode auto needs --deadline (an ISO 8601 time with its zone, or a duration such as 6h)"
                )
            parse_deadline(options.deadline)  # a malformed deadline stops the run before anything is sent
        if options.work_pool and self.settings.max_cost_usd is not None and self.limiter_url is None:
            raise ValueError(
                "--max-cost-usd with --work-pool needs --limiter-url: the budget is kept in Redis so that every "
                "worker spends from the same one"
            )
