"""prefect-anthropic: Anthropic Messages API requests in, a dataset out, at the account's rate limits."""

__version__ = "0.1.0"
