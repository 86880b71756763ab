"""benchmarks/gpu_check.py, the prepared GPU run, dry-run with tiny shapes on this machine so that it cannot rot: every
section runs (the Triton kernels in the interpreter on CPU), its checks pass and both reports are written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("KIMIVL_BACKEND",)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(tmp_path), "--dry-run",
                           "--device", "cpu"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = report["sections"]
    assert list(sections) == ["machine", "agreement", "mla", "moe", "a3b", "tests"]
    for name, sec in sections.items():
        assert sec["ok"] and sec["error"] is None, name
    assert all(c["ok"] for sec in sections.values() for c in sec["checks"])
    assert len(sections["agreement"]["checks"]) == 4  # logits, backends, graph = eager, greedy tokens
    assert len(sections["mla"]["rows"]) == 4 and len(sections["moe"]["rows"]) == 2
    whats = [row[0] for row in sections["a3b"]["rows"]]
    assert whats[0] == "prefill" and "decode step, eager" in whats and "vision tower, packed" in whats
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "## MoE layer (ok" in markdown and "| prefill | 1 | 48 |" in markdown
    assert proc.stdout.strip().splitlines()[-1].startswith("6 passed, 0 failed")
