"""Benchmarks: datasets (TSV / JSONL), the published metrics, a resumable runner and an offline synthetic suite."""

from .data import (Sample, build_prompt, circular_expand, read_dataset, read_jsonl, read_tsv, write_jsonl,
                   write_tsv)
from .errors import DataError, EvalError
from .metrics import METRICS, Metric, evaluate, get_metric
from .runner import ModelPredictor, Predictor, format_report, load_predictor, run_benchmark, run_eval
from .synthetic import make_synthetic, write_synthetic

__all__ = [
    "Sample", "build_prompt", "circular_expand", "read_dataset", "read_jsonl", "read_tsv", "write_jsonl", "write_tsv",
    "DataError", "EvalError", "METRICS", "Metric", "evaluate", "get_metric",
    "ModelPredictor", "Predictor", "format_report", "load_predictor", "run_benchmark", "run_eval", "make_synthetic",
    "write_synthetic",
]
