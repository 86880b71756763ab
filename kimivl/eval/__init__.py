"""Benchmarks: datasets (TSV / JSONL), the published metrics, a resumable runner and an offline synthetic suite."""
