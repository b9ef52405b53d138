"""Per-request records and per-cell summaries (the run directory\x27s data)."""
