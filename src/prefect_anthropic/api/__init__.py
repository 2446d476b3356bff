"""What the Anthropic API is, as data: its models and prices, request rules, rate-limit tiers and value objects,
structured-output schemas, and how money and counts are written. Imports nothing of the package but `storage`."""
