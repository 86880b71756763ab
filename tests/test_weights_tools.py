"""weights_tools: inspect, verify, reshard, convert and export-text on tiny checkpoints (and a header-only a3b
layout), checked against the safetensors library, kimivl's loader and transformers' DeepseekV3ForCausalLM."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file

import kimivl.checkpoint as ckpt_module
from kimivl import KimiVLConfig, KimiVLForConditionalGeneration
from kimivl.checkpoint import INDEX_NAME, expected_tensors, read_chunks, read_header, read_tensor, write_safetensors
from kimivl.model import parameter_counts
from weights_tools.__main__ import main
from weights_tools.inspection import inspect_checkpoint
from weights_tools.verify import all_finite, verify

from .helpers import edit_shard, shard_of, store_twice

BIAS = "language_model.model.layers.1.mlp.gate.e_score_correction_bias"


@pytest.fixture
def src(tiny_checkpoint, tmp_path):
    """A fresh, writable copy of the sharded tiny checkpoint (float32)."""
    return Path(shutil.copytree(tiny_checkpoint("tiny"), tmp_path / "src"))


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, read with the safetensors library (an independent reader)."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out |= load_file(f)
    return out


def digests(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def raw_header(file: Path) -> tuple[dict, bytes]:
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_raw(file: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    file.write_bytes(len(raw).to_bytes(8, "little") + raw + body)


# ---- the safetensors reader and writer against the safetensors library -----------------------------------------
def test_streaming_reader_and_writer_agree_with_safetensors(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"bf16": torch.randn(5, 7, generator=gen).bfloat16(), "f16": torch.randn(3, generator=gen).half(),
               "f32": torch.randn(2, 3, 4, generator=gen), "i64": torch.arange(6).reshape(2, 3),
               "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "lib.safetensors")
    header = read_header(tmp_path / "lib.safetensors")
    for k, t in tensors.items():
        got = read_tensor(tmp_path / "lib.safetensors", header[k])
        assert got.dtype == t.dtype and torch.equal(got, t), k
        chunks = list(read_chunks(tmp_path / "lib.safetensors", header[k], chunk_bytes=6))
        assert all(c.numel() * c.element_size() <= 6 for c in chunks if t.element_size() <= 6)
        flat = torch.cat([c.reshape(-1) for c in chunks]) if chunks else torch.empty(0, dtype=t.dtype)
        assert torch.equal(flat.reshape(t.shape), t), k
    # copied into a model's tensors: straight into memory of the same dtype, converted chunk by chunk, or into a
    # non-contiguous view (as `load` fills an expert's slice)
    for k, t in tensors.items():
        for dtype in {t.dtype, torch.float64}:
            if not t.dtype.is_floating_point and dtype == torch.float64:
                continue
            out = torch.full(t.shape, 7, dtype=dtype)
            ckpt_module.copy_tensor(tmp_path / "lib.safetensors", header[k], out, chunk_bytes=6)
            assert torch.equal(out, t.to(dtype)), (k, dtype)
    holder = torch.zeros(7, 5, dtype=torch.bfloat16)
    ckpt_module.copy_tensor(tmp_path / "lib.safetensors", header["bf16"], holder.t())
    assert torch.equal(holder.t(), tensors["bf16"])
    # ours, written chunk by chunk from those 6-byte pieces, read back by the library
    sources = {k: ckpt_module.TensorSource(t.dtype, tuple(t.shape),
                                           read_chunks(tmp_path / "lib.safetensors", header[k], chunk_bytes=6))
               for k, t in tensors.items()}
    size = write_safetensors(tmp_path / "ours.safetensors", sources)
    assert size == (tmp_path / "ours.safetensors").stat().st_size
    back = load_file(tmp_path / "ours.safetensors")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    with safetensors.safe_open(tmp_path / "ours.safetensors", framework="pt") as h:
        assert h.metadata() == {"format": "pt"}


def test_writer_aligns_each_tensor_to_its_element_size(tmp_path):
    """Tensors are laid out by decreasing element size (stable otherwise), as safetensors' save_file does: every
    tensor starts at a multiple of its itemsize, which the library's zero-copy loaders need."""
    tensors = {"a": torch.tensor([1.5, 2.5, 3.5]).bfloat16(), "b": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64),
               "c": torch.tensor([7], dtype=torch.int32), "d": torch.tensor([True]), "e": torch.tensor([-1.0]).half(),
               "f": torch.tensor([4.0, 5.0], dtype=torch.float64)}
    write_safetensors(tmp_path / "x.safetensors", tensors)
    header, _ = raw_header(tmp_path / "x.safetensors")
    starts = {k: header[k]["data_offsets"][0] for k in tensors}
    assert all(starts[k] % t.element_size() == 0 for k, t in tensors.items()), starts
    assert sorted(starts, key=starts.get) == ["b", "f", "c", "a", "e", "d"]
    back = load_file(tmp_path / "x.safetensors")
    assert all(back[k].dtype == t.dtype and torch.equal(back[k], t) for k, t in tensors.items())


# ---- inspect ------------------------------------------------------------------------------------------------------
def test_inspect_tiny(src, capsys):
    code, out, _ = run(capsys, "inspect", src, "--json")
    assert code == 0
    s = json.loads(out)
    counts = parameter_counts(KimiVLConfig.preset("tiny"))
    p = s["parameters"]
    assert {k: p[k]["total"] for k in ("vision", "projector", "decoder", "embeddings", "total")} == {
        k: counts[k] for k in ("vision", "projector", "decoder", "embeddings", "total")}
    assert p["decoder"]["activated"] == counts["decoder_activated"] < counts["decoder"]
    assert p["total"]["activated"] == counts["vision"] + counts["projector"] + counts["decoder_activated"]
    files = sorted(f.name for f in src.glob("*.safetensors"))
    assert [(f["file"], f["bytes"]) for f in s["shards"]] == [(f, (src / f).stat().st_size) for f in files]
    assert sum(f["tensors"] for f in s["shards"]) == len(weights(src))
    assert s["dtypes"] == {"F32": {"tensors": len(weights(src)), "parameters": counts["total"],
                                   "bytes": 4 * counts["total"]}}
    assert s["experts"]["routed_found"] == {"1": 8, "2": 8} and s["experts"]["moe_layers"] == [1, 2]
    assert s["problems"] == 0
    code, out, _ = run(capsys, "inspect", src)
    assert code == 0 and "8 routed (3 per token) + 2 shared" in out and f"{counts['total']:,}" in out


def write_header_only(path: Path, config: KimiVLConfig, shard_bytes: int = 4 * 10 ** 9) -> None:
    """A checkpoint whose headers describe every tensor of `config` in bfloat16 (float32 router biases) and whose
    data regions are holes in sparse files: the right sizes, no disk used, nothing meaningful to read."""
    path.mkdir()
    config.to_json(path / "config.json")
    shards, current, used = [], {}, 0
    for name, shape in expected_tensors(config).items():
        router_bias = name.endswith("e_score_correction_bias")
        nbytes = (4 if router_bias else 2) * torch.Size(shape).numel()
        if current and used + nbytes > shard_bytes:
            shards.append(current)
            current, used = {}, 0
        current[name] = {"dtype": "F32" if router_bias else "BF16", "shape": list(shape),
                         "data_offsets": [used, used + nbytes]}
        used += nbytes
    shards.append(current)
    weight_map = {}
    for i, header in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        raw = json.dumps(header).encode()
        with open(path / name, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + max(e["data_offsets"][1] for e in header.values()))
        weight_map |= dict.fromkeys(header, name)
    (path / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_inspect_and_verify_a3b_read_only_headers(tmp_path, monkeypatch, capsys):
    config = KimiVLConfig.preset("a3b")
    write_header_only(tmp_path / "a3b", config)

    def refuse(*args, **kwargs):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(ckpt_module, "_read_into", refuse)  # every data read of kimivl goes through it
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    s = inspect_checkpoint(tmp_path / "a3b")
    counts = parameter_counts(config)
    assert {k: s["parameters"][k]["total"] for k in ("vision", "projector", "decoder", "embeddings", "total")} == {
        k: counts[k] for k in ("vision", "projector", "decoder", "embeddings", "total")}
    assert s["parameters"]["decoder"]["activated"] == counts["decoder_activated"]
    assert s["experts"]["routed_found"] == {i: 64 for i in range(1, 27)}
    assert s["dtypes"]["BF16"]["bytes"] > 32 * 10 ** 9 and s["dtypes"]["F32"]["tensors"] == 26
    assert len(s["shards"]) == 9 and s["problems"] == 0
    assert verify(tmp_path / "a3b") == []
    code, out, _ = run(capsys, "inspect", tmp_path / "a3b")
    assert code == 0 and "27 layers (1 dense + 26 MoE)" in out and "16,407,656,048" in out


# ---- verify -------------------------------------------------------------------------------------------------------
def test_verify_clean_then_scan_finds_nan_and_inf(src, capsys):
    assert run(capsys, "verify", src, "--scan")[:2] == (0, f"{src}: ok\n")
    key = "language_model.model.layers.2.mlp.experts.3.up_proj.weight"

    def poison(t):
        t[key][0, 0], t[key][1, 1], t[key][2, 2] = float("nan"), float("inf"), -float("inf")

    edit_shard(shard_of(src, key), poison)
    assert verify(src) == []  # the headers are fine: only reading the data finds it
    code, out, err = run(capsys, "verify", src, "--scan")
    assert code == 1 and out == f"{key} in {shard_of(src, key).name}: 1 NaN and 2 Inf values of 2048\n"
    assert err.endswith(": 1 problem\n")


def test_all_finite_is_exact():
    assert all_finite(torch.tensor([3e38, 3e38]))  # the float32 sum overflows, yet every value is finite
    assert all_finite(torch.arange(4)) and all_finite(torch.randn(100).bfloat16())
    assert not all_finite(torch.tensor([1.0, float("nan")]).bfloat16())
    assert not all_finite(torch.tensor([float("inf"), -float("inf")]))  # opposite infinities do not cancel


def test_verify_wants_the_config_dtype(src):
    key = "language_model.model.layers.0.mlp.up_proj.weight"
    edit_shard(shard_of(src, key), lambda t: t.update({key: t[key].half(), BIAS: t[BIAS].half()}))
    problems = verify(src)
    f = shard_of(src, key).name
    assert f"{key} in {f}: dtype F16, expected F32 (config.json torch_dtype)" in problems
    assert any(line.startswith(f"{BIAS} in ") and "dtype F16" in line for line in problems)
    assert any(line.startswith(f"{INDEX_NAME}: metadata.total_size is ") for line in problems)  # 2 bytes fewer each
    assert len(problems) == 3
    KimiVLForConditionalGeneration.from_pretrained(src)  # the loader still accepts it (it casts)


def test_verify_checks_total_size_and_finds_stray_safetensors_files(src, tmp_path, capsys):
    index = json.loads((src / INDEX_NAME).read_text())
    total = index["metadata"]["total_size"]
    index["metadata"]["total_size"] = total + 4
    (src / INDEX_NAME).write_text(json.dumps(index))
    shutil.copyfile(sorted(src.glob("model-*.safetensors"))[0], src / "model-00001-of-00003.safetensors")
    code, out, _ = run(capsys, "verify", src)
    assert code == 1 and out.splitlines() == [
        f"{INDEX_NAME}: metadata.total_size is {total + 4}, but the tensors hold {total} bytes",
        f"model-00001-of-00003.safetensors: not part of the checkpoint, {INDEX_NAME} does not list it; remove it if "
        "it is left over"]
    # a single-file checkpoint: any other safetensors file is stray; an index without total_size is not checked
    assert run(capsys, "reshard", src, tmp_path / "one", "--max-shard-size", "1GB")[0] == 0
    (tmp_path / "one" / "old.safetensors").write_bytes(b"")
    assert verify(tmp_path / "one") == [f"old.safetensors: not part of the checkpoint, only model.safetensors is read "
                                        f"(there is no {INDEX_NAME}); remove it if it is left over"]
    del index["metadata"]
    (src / INDEX_NAME).write_text(json.dumps(index))
    (src / "model-00001-of-00003.safetensors").unlink()
    assert verify(src) == []


# ---- bad input: every tool names the file and tensor and leaves nothing behind ------------------------------------
def truncate(src):
    file = sorted(src.glob("model-*.safetensors"))[0]
    header, _ = raw_header(file)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    file.write_bytes(file.read_bytes()[:-100])
    return file.name, [last, "past the end of the file"]


def garbage_header(src):
    file = sorted(src.glob("model-*.safetensors"))[1]
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    file.write_bytes(data[:8] + b"\xff" * n + data[8 + n:])
    held = next(k for k, v in json.loads((src / INDEX_NAME).read_text())["weight_map"].items() if v == file.name)
    return file.name, ["the header is not JSON", held]


def offsets_past_end(src):
    file = sorted(src.glob("model-*.safetensors"))[0]
    header, body = raw_header(file)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    row_bytes = 4 * (torch.Size(header[last]["shape"][1:]).numel())
    header[last]["shape"][0] += 10  # a consistent entry that claims 10 more rows than the file has
    header[last]["data_offsets"][1] += 10 * row_bytes
    write_raw(file, header, body)
    return file.name, [last, "past the end of the file"]


def index_names_missing_file(src):
    index = json.loads((src / INDEX_NAME).read_text())
    index["weight_map"]["language_model.lm_head.weight"] = "model-00009-of-00009.safetensors"
    (src / INDEX_NAME).write_text(json.dumps(index))
    return "model-00009-of-00009.safetensors", ["missing (named in", "language_model.lm_head.weight"]


def stored_twice(src):
    key = "language_model.model.norm.weight"
    return store_twice(src, key).name, [key, "stored twice"]


def wrong_shape(src):
    key = "language_model.model.layers.1.self_attn.q_proj.weight"
    edit_shard(shard_of(src, key), lambda t: t.update({key: t[key][:-1].clone()}))
    return shard_of(src, key).name, [key, "shape [95, 64], expected [96, 64]"]


def wrong_dtype(src):
    key = "vision_tower.encoder.blocks.0.wo.weight"
    edit_shard(shard_of(src, key), lambda t: t.update({key: t[key].to(torch.int32)}))
    return shard_of(src, key).name, [key, "dtype I32, expected a floating-point type"]


def unsupported_dtype(src):
    key = "vision_tower.encoder.blocks.0.wo.weight"
    file = shard_of(src, key)
    header, body = raw_header(file)
    header[key]["dtype"] = "F8_E8M0"  # one byte per element: the same bytes hold 4x the elements
    header[key]["shape"][-1] *= 4
    write_raw(file, header, body)
    return file.name, [key, f"unsupported dtype F8_E8M0 for tensor {key} in {file.name}"]


def not_kimi_config(src):
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "llava"}))
    return "config.json", ["model_type is 'llava', expected 'kimi_vl'"]


@pytest.mark.parametrize("corrupt", [truncate, garbage_header, offsets_past_end, index_names_missing_file,
                                     stored_twice, wrong_shape, wrong_dtype, unsupported_dtype, not_kimi_config])
def test_bad_input_is_named_and_leaves_nothing_behind(src, capsys, corrupt):
    file, words = corrupt(src)
    before = digests(src)
    code, out, _ = run(capsys, "verify", src)
    lines = [line for line in out.splitlines() if file in line]
    assert code == 1 and lines, out
    assert any(all(w in line for w in words) for line in lines), out  # the file and the tensor on one line
    for args in (["reshard", "--max-shard-size", "300KB"], ["convert", "--dtype", "bfloat16"], ["export-text"]):
        listing = sorted(p.name for p in src.parent.iterdir())
        code, out, err = run(capsys, args[0], src, src.parent / "out", *args[1:])
        assert code == 1 and err.startswith("error: ") and file in err and words[0] in err, err
        assert sorted(p.name for p in src.parent.iterdir()) == listing  # no OUT, no staging folder
    assert digests(src) == before


# ---- reshard and convert ------------------------------------------------------------------------------------------
def test_reshard_is_bit_identical_and_copies_the_other_files(src, tmp_path, capsys):
    before, original = digests(src), weights(src)
    code, _, err = run(capsys, "reshard", src, tmp_path / "r", "--max-shard-size", "300KB")
    assert code == 0 and "100%" in err  # the progress bar went to stderr
    out = tmp_path / "r"
    index = json.loads((out / INDEX_NAME).read_text())
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) == 6 and set(index["weight_map"].values()) == {f.name for f in shards}
    for f in shards:  # each shard within the limit, or one tensor larger than it (the 327,680-byte embeddings)
        tensors = load_file(f)
        assert sum(t.numel() * t.element_size() for t in tensors.values()) <= 300_000 or len(tensors) == 1
    again = weights(out)
    assert again.keys() == original.keys()
    assert all(again[k].dtype == original[k].dtype and torch.equal(again[k], original[k]) for k in original)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in original.values())
    others = {f for f in before if not f.endswith(".safetensors") and f != INDEX_NAME}
    assert {"config.json", "preprocessor_config.json"} <= others
    assert {f: digests(out)[f] for f in others} == {f: before[f] for f in others}
    assert verify(out, scan=True) == [] and digests(src) == before
    # and back into one file: model.safetensors, no index
    assert run(capsys, "reshard", out, tmp_path / "one", "--max-shard-size", "1GB")[0] == 0
    assert sorted(f.name for f in (tmp_path / "one").glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "one" / INDEX_NAME).exists()
    one = load_file(tmp_path / "one" / "model.safetensors")
    assert all(torch.equal(one[k], original[k]) for k in original)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_convert_casts_exactly_and_keeps_router_biases_float32(src, tmp_path, capsys, dtype):
    before, original = digests(src), weights(src)
    assert run(capsys, "convert", src, tmp_path / "c", "--dtype", dtype)[0] == 0
    out, target = tmp_path / "c", getattr(torch, dtype)
    got = weights(out)
    assert got.keys() == original.keys()
    for k, t in original.items():
        want = t if k.endswith("e_score_correction_bias") else t.to(target)
        assert got[k].dtype == want.dtype and torch.equal(got[k], want), k
    cfg, old = json.loads((out / "config.json").read_text()), json.loads((src / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["vision_config"]["torch_dtype"] == cfg["text_config"]["torch_dtype"] == dtype
    for part in (cfg, cfg["vision_config"], cfg["text_config"]):
        part["torch_dtype"] = "float32"
    assert cfg == old  # nothing else changed
    assert verify(out) == [] and digests(src) == before
    model = KimiVLForConditionalGeneration.from_pretrained(out, dtype=dtype)
    assert model.language_model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(model.language_model.lm_head.weight, original["language_model.lm_head.weight"].to(target))


def test_convert_that_overflows_fails_midway_and_cleans_up(src, tmp_path, capsys, monkeypatch):
    key = "language_model.lm_head.weight"  # written last: earlier shards are already on disk when it fails
    edit_shard(shard_of(src, key), lambda t: t[key].__setitem__((3, 5), 1e6))
    calls = []

    def spy(file, *args, **kwargs):
        calls.append(file)
        return write_safetensors(file, *args, **kwargs)

    monkeypatch.setattr(ckpt_module, "write_safetensors", spy)
    code, _, err = run(capsys, "convert", src, tmp_path / "c", "--dtype", "float16", "--max-shard-size", "300KB")
    assert code == 1 and f"error: {key} in {shard_of(src, key).name}: 1 values overflow float16" in err
    assert len(calls) > 1  # it failed after writing at least one shard
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert run(capsys, "convert", src, tmp_path / "c", "--dtype", "bfloat16")[0] == 0  # bfloat16 has the range


def test_output_rules_existing_forced_interrupted_and_the_input_itself(src, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    assert run(capsys, "reshard", src, out, "--max-shard-size", "1GB")[0] == 0
    first = digests(out)
    code, _, err = run(capsys, "reshard", src, out, "--max-shard-size", "300KB")
    assert code == 1 and "already exists; pass --force" in err and digests(out) == first
    # interrupted (Ctrl-C) while writing the second shard: one line, status 130, the old OUT stays whole, no
    # staging folder remains; SIGTERM is turned into SystemExit while main runs, and restored after
    real, calls, previous = ckpt_module.write_safetensors, [], signal.getsignal(signal.SIGTERM)

    def interrupted(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(signal.getsignal(signal.SIGTERM))
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt_module, "write_safetensors", interrupted)
    code, _, err = run(capsys, "reshard", src, out, "--max-shard-size", "300KB", "--force")
    assert code == 130 and err.splitlines()[-1] == "interrupted: nothing was written" and "Traceback" not in err
    monkeypatch.undo()
    assert calls[0] is not previous and signal.getsignal(signal.SIGTERM) is previous
    with pytest.raises(SystemExit) as exit_info:
        calls[0](signal.SIGTERM, None)
    assert exit_info.value.code == 143
    assert digests(out) == first and sorted(p.name for p in tmp_path.iterdir()) == ["r", "src"]
    assert run(capsys, "reshard", src, out, "--max-shard-size", "300KB", "--force")[0] == 0
    assert len(list(out.glob("*.safetensors"))) == 6 and sorted(p.name for p in tmp_path.iterdir()) == ["r", "src"]
    before = digests(src)
    for target in (src, src / "inner", tmp_path):
        code, _, err = run(capsys, "reshard", src, target, "--max-shard-size", "300KB", "--force")
        assert code == 1 and "is, contains or lies inside the input" in err
    assert digests(src) == before
    code, _, err = run(capsys, "reshard", src, tmp_path / "no" / "such" / "r", "--max-shard-size", "1GB")
    assert code == 1 and "does not exist; create it first" in err
    for size in ("lots", "1e400", "0.5"):  # one error line naming the value, no traceback
        code, _, err = run(capsys, "reshard", src, tmp_path / "x", "--max-shard-size", size)
        assert code == 1 and err.startswith(f"error: cannot read a size from {size!r}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r", "src"]


SIGTERM_CHILD = """
import os, signal, sys, time
import kimivl.checkpoint as ckpt
from weights_tools.__main__ import main
real = ckpt.write_safetensors

def terminated(file, *args, **kwargs):  # SIGTERM once the first shard is in the staging folder
    real(file, *args, **kwargs)
    print(file.parent.name, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)  # the handler interrupts this

ckpt.write_safetensors = terminated
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_removes_the_staging_folder(src, tmp_path):
    """kill <pid> during a rewrite: exit status 143, no OUT and no hidden staging folder left behind."""
    proc = subprocess.run([sys.executable, "-c", SIGTERM_CHILD, "reshard", str(src), str(tmp_path / "r"),
                           "--max-shard-size", "300KB"], cwd=Path(__file__).parents[1], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 143, proc.stderr
    assert proc.stdout.startswith(".r.partial-")  # it was killed mid-write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_symlink_output_is_replaced_not_followed(src, tmp_path, capsys):
    target = tmp_path / "target"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    link, dangling = tmp_path / "link", tmp_path / "dangling"
    link.symlink_to(target, target_is_directory=True)
    dangling.symlink_to(tmp_path / "nowhere", target_is_directory=True)
    for out in (link, dangling):
        code, _, err = run(capsys, "reshard", src, out, "--max-shard-size", "1GB")
        assert code == 1 and f"output {out} already exists; pass --force" in err, err
    assert not (tmp_path / "nowhere").exists() and digests(target) == {"notes.txt": digests(target)["notes.txt"]}
    for out in (link, dangling):  # --force replaces the link itself; its target is left alone
        assert run(capsys, "reshard", src, out, "--max-shard-size", "1GB", "--force")[0] == 0
        assert not out.is_symlink() and out.is_dir() and verify(out) == []
    assert [p.name for p in target.iterdir()] == ["notes.txt"] and (target / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "nowhere").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "link", "src", "target"]


def test_force_replaces_only_a_checkpoint_or_an_empty_folder(src, tmp_path, capsys):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    (tmp_path / "file").write_text("data")
    for out in (home, tmp_path / "file"):
        code, _, err = run(capsys, "reshard", src, out, "--max-shard-size", "1GB", "--force")
        assert code == 1 and "is not a checkpoint (no config.json) nor an empty folder" in err, err
    assert (home / "thesis.tex").read_text() == "years of work" and (tmp_path / "file").read_text() == "data"
    (tmp_path / "empty").mkdir()
    for out in ("empty", "empty"):  # an empty folder, then the checkpoint now there
        assert run(capsys, "reshard", src, tmp_path / out, "--max-shard-size", "1GB", "--force")[0] == 0
    assert verify(tmp_path / "empty") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "home", "src"]


# ---- export-text --------------------------------------------------------------------------------------------------
def test_export_text_loads_in_transformers_with_the_same_logits(src, tmp_path, capsys, report):
    from transformers import DeepseekV3ForCausalLM
    before = digests(src)
    assert run(capsys, "export-text", src, tmp_path / "hf", "--max-shard-size", "500KB")[0] == 0
    out = tmp_path / "hf"
    files = sorted(p.name for p in out.iterdir())
    assert "preprocessor_config.json" not in files and INDEX_NAME in files
    assert {f for f in before if f.startswith(("tokenizer", "tiktoken", "chat_template"))} <= set(files)
    exported = weights(out)
    original = weights(src)
    assert exported.keys() == {k.removeprefix("language_model.") for k in original if k.startswith("language_model.")}
    assert all(torch.equal(t, original["language_model." + k]) for k, t in exported.items())
    assert digests(src) == before
    ref, info = DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager",
                                                      output_loading_info=True)
    assert not any(info.values()), info  # every weight loaded, none missing, unexpected or mismatched
    ours = KimiVLForConditionalGeneration.from_pretrained(src)
    ids = torch.randint(0, 1024, (2, 29))
    with torch.no_grad():
        want, got = ref.eval()(ids).logits.float(), ours(ids).logits
    diff = (got - want).abs().max().item()
    report("max |logit kimivl - transformers on the export|", f"{diff:.2e}")
    assert diff <= 1e-5 and want.std() > 0.1
