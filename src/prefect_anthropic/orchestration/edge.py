"""The edge: flags, blocks, the environment and the defaults in, a `RunSetup` out. The CLI, the flows and the
work-pool shard flow come here; blocks are read only when one is named (Prefect is loaded for that alone)."""

from __future__ import annotations

from ..dataset.setup import RunSetup
from ..settings import ClientSettings, RunOptions
from ..storage import Storage

__all__ = ["resolve_run", "resolve_storage"]


async def resolve_run(
    settings: ClientSettings | None = None,
    options: RunOptions | None = None,
    *,
    client_block: str | None = None,
    credentials_block: str | None = None,
    api_key: str | None = None,
) -> RunSetup:
    """The run's resolved configuration: a client block's settings with the explicit ones over them (or the
    explicit ones alone), the credentials' endpoint and key, the storage block's options, the limiter
    block's URL. Only block names travel as parameters; what they hold is read here."""
    options = options if options is not None else RunOptions()
    settings = settings if settings is not None else ClientSettings()
    limiter_url = None
    if client_block or credentials_block:
        from .blocks import resolve_settings

        settings, api_key = await resolve_settings(settings, client_block, credentials_block)
    if settings.limiter_block and settings.redis_url is None:
        from .blocks import redis_url_from_block

        limiter_url = await redis_url_from_block(settings.limiter_block)
    return RunSetup.resolve(
        settings,
        options,
        api_key=api_key,
        storage_options=await _block_storage_options(options.storage_block),
        limiter_url=limiter_url,
    )


async def resolve_storage(storage_block: str | None = None) -> Storage:
    """How to reach the run's locations: the environment's storage options, over a block's when one is named."""
    return Storage.from_environment(await _block_storage_options(storage_block))


async def _block_storage_options(storage_block: str | None) -> dict[str, object] | None:
    if storage_block is None:
        return None
    from .blocks import block_storage_options

    return await block_storage_options(storage_block)
