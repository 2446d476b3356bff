"""The data path without Prefect: input -> shards -> the run's client -> shard results -> merge -> Parquet/JSONL;
the output's hold (lock and leases), progress, estimates, and the run's steps in plain asyncio (`pipeline`)."""
