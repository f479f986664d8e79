"""`ortlora serve`: OpenAI-compatible HTTP server, continuous batching across adapters, tenants, metrics."""
