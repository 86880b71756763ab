"""The `kimivl generate` and `kimivl chat` commands on a tiny checkpoint."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from kimivl import KimiVLForConditionalGeneration, KimiVLProcessor, generate
from kimivl.cli import main

SAMPLE = Path(__file__).parent.parent / "assets" / "sample.png"


def test_generate_streams_the_same_answer_as_the_api(tiny_checkpoint, capsys):
    model_dir = tiny_checkpoint()
    args = ["generate", "--model", model_dir, "--image", str(SAMPLE), "--prompt", "What is in the image?",
            "--max-new-tokens", "12"]
    assert main(args) == 0
    streamed = capsys.readouterr()
    assert main(args + ["--no-stream"]) == 0
    whole = capsys.readouterr()
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(SAMPLE)},
                                         {"type": "text", "text": "What is in the image?"}]}]
    expected = generate(KimiVLForConditionalGeneration.from_pretrained(model_dir),
                        KimiVLProcessor.from_pretrained(model_dir), msgs, max_new_tokens=12)
    assert streamed.out == whole.out == expected + "\n"
    assert "prefill" in streamed.err and "decode" in streamed.err and "tok/s" in streamed.err


@pytest.mark.parametrize("extra, message", [
    (["--image", "missing.png"], "error: image file not found: missing.png"),
    (["--max-new-tokens", "3000"], "beyond the model's context of 2048 tokens"),
    (["--prompt", "  "], "error: --prompt is empty"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
])
def test_generate_bad_input_is_one_line_and_nonzero(tiny_checkpoint, capsys, extra, message):
    args = ["generate", "--model", tiny_checkpoint(), "--prompt", "hi"] + extra
    assert main(args) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_wrong_model_dir_and_undecodable_image(tiny_checkpoint, tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 1
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "img.png").write_bytes(b"garbage")
    assert main(["generate", "--model", tiny_checkpoint(), "--prompt", "hi", "--image", str(tmp_path / "img.png")]) == 1
    assert "cannot decode image" in capsys.readouterr().err


def test_chat_session(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    Image.new("RGB", (40, 30), "red").save(tmp_path / "red.png")
    session = (f"/image {tmp_path / 'red.png'}\nwhat colour?\n/image {tmp_path / 'nope.png'}\nand now?\n"
               "/bogus\n/reset\nhi\n/exit\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO(session))
    assert main(["chat", "--model", tiny_checkpoint(), "--max-new-tokens", "4"]) == 0
    err = capsys.readouterr().err
    assert err.count("[prefill") == 3  # three answered turns
    assert "image file not found" in err and "unknown command /bogus" in err


def test_closed_stdout_is_not_an_error(tiny_checkpoint):
    """`kimivl generate ... | head -c 5`: the reader goes away; no traceback, no error line."""
    proc = subprocess.Popen([sys.executable, "-m", "kimivl.cli", "generate", "--model", tiny_checkpoint(), "--prompt",
                             "hi", "--max-new-tokens", "200"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(5)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and "Traceback" not in err and "error" not in err


def test_console_script_runs():
    """The installed `kimivl` entry point, as the README uses it (a fresh process)."""
    out = subprocess.run([sys.executable, "-m", "kimivl.cli", "generate", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--max-new-tokens" in out.stdout


def test_readme_python_example_runs(tiny_checkpoint, capsys):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("```python", readme.index("## Python")) + len("```python")
    code = readme[start:readme.index("```", start)]
    code = code.replace('"runs/demo-tiny"', repr(tiny_checkpoint())).replace('"assets/sample.png"', repr(str(SAMPLE)))
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()
