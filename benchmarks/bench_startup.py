"""Time to first token of `kimivl generate` on the tiny checkpoint, as a user sees it: from starting the command to
the first byte of the answer on stdout, against `python -c "import torch"` (the floor no command that uses torch can
beat) in the same run.

    .venv/bin/python benchmarks/bench_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def first_byte(command: list[str]) -> tuple[float, float]:
    """(seconds to the first byte on stdout, seconds to exit)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    process.stdout.read(1)
    first = time.perf_counter() - start
    process.stdout.read()
    process.wait()
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed with status {process.returncode}")
    return first, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as work:
        subprocess.run([sys.executable, "-m", "weights_tools", "make-tiny", work, "--force"], check=True,
                       stdout=subprocess.DEVNULL, cwd=ROOT)
        commands = {
            "python -c 'import torch; print(1)'": [sys.executable, "-c", "import torch; print(1)"],
            "kimivl generate (tiny, one image, 8 tokens)": [
                str(bin_dir / "kimivl"), "generate", "--model", work, "--image", str(ROOT / "assets" / "sample.png"),
                "--prompt", "What is in this image?", "--max-new-tokens", "8"],
        }
        times = {name: [] for name in commands}
        for _ in range(args.repeats):  # interleaved, so a busy moment slows both
            for name, command in commands.items():
                times[name].append(first_byte(command))
    print(f"median of {args.repeats} runs\n\n| command | first byte on stdout | exit |\n|---|---|---|")
    for name, runs in times.items():
        print(f"| {name} | {statistics.median(r[0] for r in runs):.2f} s | "
              f"{statistics.median(r[1] for r in runs):.2f} s |")


if __name__ == "__main__":
    main()
