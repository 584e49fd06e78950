"""Core: configuration, records, tasks, models and adapters, errors. Imports nothing above it."""
