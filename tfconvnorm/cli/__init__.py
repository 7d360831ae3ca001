"""Command-line tools: flags only; the work is in the library (`analysis`, `training`)."""
