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
    # the second turn continues the first; after /reset only the system prompt and chat markers are shared
    assert err.count("more reused from the cache") == 2
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


def test_generate_imports_neither_training_nor_eval(tiny_checkpoint):
    """`kimivl generate` builds only its own flags: the trainer's and eval's modules (and torch.distributed.tensor,
    which the trainer imports) stay unloaded, which is most of the start-up they used to cost; `kimivl --help` and
    `kimivl train --help` still list everything."""
    code = ("import sys; from kimivl.cli import main; main(sys.argv[1:]); "
            "print(sorted(m for m in sys.modules if m.startswith(('kimivl.train', 'kimivl.eval', "
            "'torch.distributed.tensor'))))")
    out = subprocess.run([sys.executable, "-c", code, "generate", "--model", tiny_checkpoint(), "--prompt", "hi",
                          "--max-new-tokens", "2"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.rstrip().endswith("[]"), out.stdout + out.stderr
    usage = subprocess.run([sys.executable, "-m", "kimivl.cli", "--help"], capture_output=True, text=True).stdout
    assert "eval" in usage and "train" in usage
    sft = subprocess.run([sys.executable, "-m", "kimivl.cli", "train", "sft", "--help"], capture_output=True,
                         text=True).stdout
    assert "--lora-rank" in sft


def test_readme_python_example_runs(tiny_checkpoint, capsys):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("```python", readme.index("## Python")) + len("```python")
    code = readme[start:readme.index("```", start)]
    code = code.replace('"runs/demo-tiny"', repr(tiny_checkpoint())).replace('"assets/sample.png"', repr(str(SAMPLE)))
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()


# ---- the checkpoint's generation_config.json, Thinking checkpoints -------------------------------------------------
def checkpoint_copy(src: str, dst: Path, generation: dict | None = None, preprocessor: dict | None = None) -> str:
    """A copy of checkpoint `src` with a generation_config.json and preprocessor settings changed."""
    import json
    import shutil

    shutil.copytree(src, dst)
    if generation is not None:
        (dst / "generation_config.json").write_text(json.dumps(generation))
    if preprocessor is not None:
        settings = json.loads((dst / "preprocessor_config.json").read_text())
        (dst / "preprocessor_config.json").write_text(json.dumps(settings | preprocessor))
    return str(dst)


def test_generation_config_sets_the_defaults(tiny_checkpoint, tmp_path):
    """A shipped generation_config.json gives generate's sampling defaults (do_sample: transformers' top_k 50 and
    top_p 1 where it is silent), its eos ids stop model.generate without the caller naming them and its pad id pads;
    explicit settings win; save_pretrained keeps the file."""
    import torch

    from kimivl.generation import GenerationConfig, generate_tokens

    plain = KimiVLForConditionalGeneration.from_pretrained(tiny_checkpoint())
    processor = KimiVLProcessor.from_pretrained(tiny_checkpoint())
    inputs = processor([[{"role": "user", "content": "Say something."}], [{"role": "user", "content": "Hi"}]])
    greedy = plain.generate(**inputs, max_new_tokens=8, stop_ids=[]).tolist()
    stop = greedy[0][2]  # the checkpoint's end id: greedy decoding reaches it at step 2 of row 0 only
    assert stop not in greedy[0][:2] + greedy[1]
    path = checkpoint_copy(tiny_checkpoint(), tmp_path / "ckpt", {"eos_token_id": [stop], "pad_token_id": 7,
                                                                  "do_sample": True, "temperature": 0.7})
    model = KimiVLForConditionalGeneration.from_pretrained(path)
    assert model.generation_config.sampling == {"temperature": 0.7, "top_k": 50, "top_p": 1.0}
    out = model.generate(**inputs, max_new_tokens=8, temperature=0).tolist()  # explicit greedy wins
    assert out == [greedy[0][:3] + [7] * 5, greedy[1]]
    sampled = model.generate(**inputs, max_new_tokens=8, stop_ids=[], seed=3)
    spelled = torch.stack(list(generate_tokens(model, **inputs, config=GenerationConfig(
        max_new_tokens=8, temperature=0.7, top_k=50, seed=3))), 1)
    assert sampled.tolist() == spelled.tolist() and sampled.tolist() != greedy
    model.save_pretrained(tmp_path / "saved")
    assert KimiVLForConditionalGeneration.from_pretrained(tmp_path / "saved").generation_config == \
        model.generation_config


def test_generate_cli_follows_the_generation_config(tiny_checkpoint, tmp_path, capsys):
    path = checkpoint_copy(tiny_checkpoint(), tmp_path / "ckpt", {"eos_token_id": 1025, "do_sample": True,
                                                                  "temperature": 0.2})
    args = ["generate", "--model", path, "--prompt", "hi", "--max-new-tokens", "4", "--seed", "1"]
    assert main(args) == 0
    assert "sampling as the checkpoint's generation_config.json says: temperature 0.2, top_k 50, top_p 1" in \
        capsys.readouterr().err
    assert main(args + ["--temperature", "0"]) == 0
    greedy = capsys.readouterr()
    assert "sampling as" not in greedy.err
    assert main(["generate", "--model", tiny_checkpoint(), "--prompt", "hi", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == greedy.out  # no generation config: greedy, as before
    (Path(path) / "generation_config.json").write_text('{"do_sample": true, "temperature": -1}')
    assert main(args) == 1
    assert "generation_config.json: temperature must be a number >= 0" in capsys.readouterr().err


def test_generate_on_a_thinking_2506_checkpoint(tiny_checkpoint, tmp_path, capsys):
    """Thinking-2506 ships in_token_limit 16384 (3.2 million pixels an image, 4x Instruct's 4096 patches) and samples
    by default: a 1792 x 1792 image keeps its full 128 x 128 patch grid, and `kimivl generate` answers."""
    from kimivl.processing import KimiVLImageProcessor

    path = checkpoint_copy(tiny_checkpoint(), tmp_path / "thinking", {"eos_token_id": [1025], "do_sample": True,
                                                                      "temperature": 0.8},
                           {"in_token_limit": 16384})
    assert KimiVLImageProcessor.from_pretrained(path).target_size(1792, 1792) == (1792, 1792)
    assert KimiVLImageProcessor.from_pretrained(tiny_checkpoint()).target_size(1792, 1792) == (896, 896)
    assert main(["generate", "--model", path, "--image", str(SAMPLE), "--prompt", "Think, then answer.",
                 "--max-new-tokens", "6", "--seed", "0"]) == 0
    assert "temperature 0.8" in capsys.readouterr().err


def test_thinking_is_streamed_to_stderr_and_the_answer_to_stdout(capsys):
    """The ◁think▷...◁/think▷ part goes to stderr, the answer to stdout, even with the markers cut between
    deltas; text without markers is all answer."""
    from kimivl.cli import ThinkingSplit

    split = ThinkingSplit()
    for delta in ["◁th", "ink▷Two and ", "two◁/", "think", "▷ make ", "four."]:
        split.push(delta)
    split.push("", final=True)
    out = capsys.readouterr()
    assert (out.err, out.out) == ("Two and two", " make four.")
    plain = ThinkingSplit()
    plain.push("◁ a triangle ◁")  # a marker's first character, held back until the end
    plain.push("", final=True)
    assert capsys.readouterr().out == "◁ a triangle ◁"
