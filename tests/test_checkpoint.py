"""Checkpoint I/O: official layout, bit-identical round trips, and a clear error for every kind of bad input."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm import tqdm

from kimivl import CheckpointError, InputError, KimiVLForConditionalGeneration
from kimivl.checkpoint import INDEX_NAME, TensorSource, parse_size, plan_shards, to_official, write_shards
from weights_tools.__main__ import main as weights_tools_main

from .helpers import edit_shard, shard_of, store_twice


def state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)


def test_make_tiny_writes_a_sharded_official_checkpoint(tmp_path):
    assert weights_tools_main(["make-tiny", str(tmp_path / "t"), "--seed", "3"]) == 0
    files = sorted(p.name for p in (tmp_path / "t").iterdir())
    assert files == ["chat_template.jinja", "config.json", "model-00001-of-00002.safetensors",
                     "model-00002-of-00002.safetensors", INDEX_NAME, "preprocessor_config.json", "tiktoken.model",
                     "tokenizer_config.json"]
    index = json.loads((tmp_path / "t" / INDEX_NAME).read_text())
    on_disk = {}
    for f in set(index["weight_map"].values()):
        with safe_open(tmp_path / "t" / f, framework="pt") as h:
            on_disk |= {k: f for k in h.keys()}
    assert on_disk == index["weight_map"]
    # the names are the official ones (pinned): per-expert routed experts, no stacked tensors
    for name in ["language_model.model.layers.1.mlp.experts.7.down_proj.weight",
                 "language_model.model.layers.2.mlp.experts.0.gate_proj.weight",
                 "language_model.model.layers.1.mlp.gate.e_score_correction_bias",
                 "language_model.model.layers.0.mlp.gate_proj.weight",
                 "language_model.model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
                 "vision_tower.encoder.blocks.1.wqkv.bias", "vision_tower.patch_embed.pos_emb.weight",
                 "multi_modal_projector.linear_2.bias", "language_model.lm_head.weight"]:
        assert name in on_disk
    assert not any("gate_up_proj" in k or k.endswith("experts.down_proj") for k in on_disk)


def test_make_tiny_bad_arguments(tmp_path):
    (tmp_path / "file").write_text("x")
    assert weights_tools_main(["make-tiny", str(tmp_path / "file")]) == 1
    assert weights_tools_main(["make-tiny", str(tmp_path / "d"), "--shards", "0"]) == 1
    assert not (tmp_path / "d").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("keep me")
    assert weights_tools_main(["make-tiny", str(tmp_path / "mine")]) == 1  # not empty: refused
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["thesis.txt"]
    assert weights_tools_main(["make-tiny", str(tmp_path / "mine"), "--force"]) == 0
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "keep me" and (tmp_path / "mine" / "config.json").exists()


def test_load_error_lists_at_most_twenty_problems(tiny_checkpoint, tmp_path):
    """A config that does not match the weights at all (here: a different preset) gives a bounded message."""
    ckpt = tmp_path / "c"
    shutil.copytree(tiny_checkpoint(), ckpt)
    other = json.loads((ckpt / "config.json").read_text())
    other["text_config"]["hidden_size"] = 96
    (ckpt / "config.json").write_text(json.dumps(other))
    with pytest.raises(CheckpointError) as e:
        KimiVLForConditionalGeneration.from_pretrained(ckpt)
    lines = str(e.value).splitlines()
    assert "problems" in lines[0] and len(lines) == 1 + 20 + 1 and lines[-1].strip().startswith("... and ")


def test_expert_names_map_to_stacked_slices(tiny_checkpoint):
    model = KimiVLForConditionalGeneration.from_pretrained(tiny_checkpoint("tiny"))
    official = to_official(model.state_dict())
    experts = model.language_model.model.layers[2].mlp.experts
    inter = model.config.text_config.moe_intermediate_size
    p = "language_model.model.layers.2.mlp.experts.5."
    assert torch.equal(official[p + "gate_proj.weight"], experts.gate_up_proj[5, :inter])
    assert torch.equal(official[p + "up_proj.weight"], experts.gate_up_proj[5, inter:])
    assert torch.equal(official[p + "down_proj.weight"], experts.down_proj[5])
    # and the files hold exactly those tensors
    on_disk = {}
    for f in Path(tiny_checkpoint("tiny")).glob("model-*.safetensors"):
        on_disk |= load_file(f)
    assert on_disk.keys() == official.keys()
    assert all(torch.equal(on_disk[k], official[k]) for k in official)


@pytest.mark.parametrize("max_shard_size", ["1GB", 300_000])
def test_save_load_round_trip_is_bit_identical(tiny_checkpoint, tmp_path, max_shard_size):
    model = KimiVLForConditionalGeneration.from_pretrained(tiny_checkpoint("tiny-qlora"))
    model.save_pretrained(tmp_path, max_shard_size=max_shard_size)
    sharded = (tmp_path / INDEX_NAME).exists()
    assert sharded == (max_shard_size == 300_000)
    assert ((tmp_path / "model.safetensors").exists()) != sharded
    again = KimiVLForConditionalGeneration.from_pretrained(tmp_path)
    assert again.config == model.config
    assert state_equal(model, again)
    # saving again into the same directory with another sharding leaves no stale weight files behind
    again.save_pretrained(tmp_path, max_shard_size="1GB" if sharded else 300_000)
    assert state_equal(model, KimiVLForConditionalGeneration.from_pretrained(tmp_path))
    assert len(list(tmp_path.glob("*.safetensors"))) == (1 if sharded else len(
        set(json.loads((tmp_path / INDEX_NAME).read_text())["weight_map"].values())))


def test_load_in_bfloat16_and_save_records_dtype(tiny_checkpoint, tmp_path):
    model = KimiVLForConditionalGeneration.from_pretrained(tiny_checkpoint("tiny"), dtype="bfloat16")
    for name, p in model.named_parameters():  # router correction biases stay float32 (routing is done in float32)
        assert p.dtype == (torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16), name
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(tmp_path / "model.safetensors", framework="pt") as h:
        assert h.get_slice("language_model.model.layers.1.mlp.gate.e_score_correction_bias").get_dtype() == "F32"
        assert h.get_slice("language_model.model.layers.1.mlp.gate.weight").get_dtype() == "BF16"
    assert state_equal(model, KimiVLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16))


def test_load_progress_bar(tiny_checkpoint, capsys):
    """A bar over the bytes read, on request (and by default only on a terminal: none here, where stderr is not)."""
    model = KimiVLForConditionalGeneration.from_pretrained(tiny_checkpoint("tiny"), progress=True)
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    err = capsys.readouterr().err
    size = tqdm.format_sizeof(total)
    assert "load " in err and "100%" in err and f"{size}/{size}" in err
    KimiVLForConditionalGeneration.from_pretrained(tiny_checkpoint("tiny"))
    assert capsys.readouterr().err == ""


def test_loading_never_unpickles(tiny_checkpoint, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    KimiVLForConditionalGeneration.from_pretrained(tiny_checkpoint("tiny"))


def test_loading_builds_on_meta_and_never_initialises_weights(tiny_checkpoint, monkeypatch):
    devices = []
    real = torch.nn.init.kaiming_uniform_

    def spy(tensor, *args, **kwargs):
        devices.append(tensor.device.type)
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", spy)
    KimiVLForConditionalGeneration.from_pretrained(tiny_checkpoint("tiny"))
    assert devices and set(devices) == {"meta"}  # nn.Linear/Conv2d init ran only on shapeless meta tensors


def test_save_size_helpers():
    assert parse_size("5GB") == 5 * 10 ** 9 and parse_size("2MiB") == 2 * 2 ** 20 and parse_size(123) == 123
    assert parse_size("1") == 1 and parse_size("1.5KB") == 1500 and parse_size("2e6") == 2 * 10 ** 6
    assert plan_shards({"a": 4, "b": 4, "c": 9, "d": 1}, 8) == [["a", "b"], ["c"], ["d"]]
    # not a number, not positive, infinite (float overflow), or under one byte
    for bad in ("lots", 0, "-1GB", "1.2.3", "nan", "1e400", "1e308TB", "0.5", "0.0001KB"):
        with pytest.raises(InputError, match=f"cannot read a size from {bad!r}"):
            parse_size(bad)


def test_write_shards_plans_names_writes_and_indexes(tmp_path):
    """The one sharded writer behind save, the checkpoint tools and the benchmark: shards in order, each within the
    limit (or one larger tensor), an index only for more than one file."""
    tensors = {"a": torch.arange(4.0), "b": torch.ones(2, 2, dtype=torch.bfloat16), "c": torch.zeros(9)}
    sources = {"a": TensorSource(torch.float32, (4,), [torch.arange(2.0), torch.arange(2.0, 4.0)]),
               "b": tensors["b"], "c": TensorSource(torch.float32, (9,), [torch.zeros(9)])}
    names = write_shards(tmp_path, sources, 24)  # a: 16 bytes, b: 8, c: 36
    assert names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index == {"metadata": {"total_size": 60}, "weight_map": {"a": names[0], "b": names[0], "c": names[1]}}
    back = load_file(tmp_path / names[0]) | load_file(tmp_path / names[1])
    assert all(torch.equal(back[k], t) and back[k].dtype == t.dtype for k, t in tensors.items())
    (tmp_path / "one").mkdir()
    assert write_shards(tmp_path / "one", tensors, "1KB") == ["model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["model.safetensors"]


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "int8"}, "dtype must be a floating-point"), ({"dtype": 3}, "dtype must be a floating-point"),
    ({"device": "gpu0"}, "not a torch device"),
])
def test_bad_load_arguments(tiny_checkpoint, kwargs, message):
    with pytest.raises(InputError, match=message):
        KimiVLForConditionalGeneration.from_pretrained(tiny_checkpoint("tiny"), **kwargs)


def test_interrupted_save_loads_old_or_new(tiny_checkpoint, tmp_path, monkeypatch):
    """Overwrite a sharded checkpoint (with tokenizer files beside it) with another model and interrupt the save at
    every file-system step it takes: the folder then loads the old model or the new one, whole, and keeps its other
    files; the next save removes anything left beside it."""
    import kimivl.checkpoint as ckpt_module
    import kimivl.fsutil as fsutil
    old = KimiVLForConditionalGeneration.from_pretrained(tiny_checkpoint("tiny"))
    new = KimiVLForConditionalGeneration.from_pretrained(tiny_checkpoint("tiny"))
    with torch.no_grad():
        for p in new.parameters():
            p.add_(1.0)

    points = [(ckpt_module, "write_safetensors"), (fsutil, "exchange"), (ckpt_module.os, "link"),
              (fsutil.shutil, "rmtree")]
    seen = set()
    for module, fn_name in points:
        for stop_after in range(3):
            target = tmp_path / f"{fn_name}{stop_after}"
            old.save_pretrained(target, max_shard_size=300_000)
            (target / "tokenizer_config.json").write_text("{}")
            real, calls = getattr(module, fn_name), []

            def flaky(*args, **kwargs):
                if len(calls) == stop_after:
                    raise KeyboardInterrupt
                calls.append(args)
                return real(*args, **kwargs)

            monkeypatch.setattr(module, fn_name, flaky)
            try:
                new.save_pretrained(target, max_shard_size=300_000)
            except KeyboardInterrupt:
                seen.add(fn_name)
            monkeypatch.undo()
            loaded = KimiVLForConditionalGeneration.from_pretrained(target)
            assert state_equal(loaded, old) or state_equal(loaded, new), (fn_name, stop_after)
            assert (target / "tokenizer_config.json").read_text() == "{}"
            new.save_pretrained(target)  # the next save removes what an interrupted cleanup left beside it
            assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert seen == {fn for _, fn in points}  # each interruption did land inside the save


def test_save_keeps_unrelated_files(tiny_checkpoint, tmp_path):
    (tmp_path / "model_ema.safetensors").write_bytes(b"not ours")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    model = KimiVLForConditionalGeneration.from_pretrained(tiny_checkpoint("tiny"))
    model.save_pretrained(tmp_path, max_shard_size=300_000)
    model.save_pretrained(tmp_path)  # sharded -> single: the old shards go, nothing else does
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "model.safetensors", "model_ema.safetensors", "tokenizer_config.json"]


# ---- bad input: one clear CheckpointError naming the file and tensor ------------------------------------------
@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path):
    """A fresh, writable copy of the sharded tiny checkpoint."""
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("tiny"), out)
    return out


def load_error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        KimiVLForConditionalGeneration.from_pretrained(path)
    return str(info.value)


def test_error_wrong_path(tmp_path):
    assert "no such checkpoint directory" in load_error(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    assert "is a file" in load_error(tmp_path / "file")


@pytest.mark.parametrize("content, message", [
    (b"[1, 2]", "must be a JSON object, got list"),
    (b"\xff\xfe{}", "is not valid JSON"),
])
def test_error_malformed_config(ckpt, content, message):
    (ckpt / "config.json").write_bytes(content)
    assert message in load_error(ckpt)


def test_error_config_is_a_directory(ckpt):
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").mkdir()
    msg = load_error(ckpt)
    assert "config.json" in msg and "config.json/config.json" not in msg


def test_error_missing_or_broken_config(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text("{not json")
    assert "config.json is not valid JSON" in load_error(ckpt)
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": "llava"}))
    assert "model_type is 'llava', expected 'kimi_vl'" in load_error(ckpt)
    (ckpt / "config.json").unlink()
    assert "no config file" in load_error(ckpt)


def test_error_lists_every_tensor_problem(ckpt):
    key_shape = "language_model.model.layers.1.self_attn.q_proj.weight"
    key_gone = "vision_tower.encoder.blocks.0.wo.bias"
    edit_shard(shard_of(ckpt, key_shape), lambda t: t.update({key_shape: t[key_shape][:-1].clone()}))

    def drop_and_add(t):
        del t[key_gone]
        t["language_model.model.layers.1.mlp.experts.99.up_proj.weight"] = torch.zeros(2)

    edit_shard(shard_of(ckpt, key_gone), drop_and_add)
    msg = load_error(ckpt)
    assert f"{key_shape} in {shard_of(ckpt, key_shape).name}: shape [95, 64], expected [96, 64]" in msg
    assert f"{key_gone}: missing ({INDEX_NAME} says {shard_of(ckpt, key_gone).name}, which does not hold it)" in msg
    assert "experts.99.up_proj.weight in" in msg and "unexpected tensor" in msg


def test_error_tensor_in_two_shards(ckpt):
    key = "language_model.lm_head.weight"
    store_twice(ckpt, key)
    assert f"{key}: stored twice" in load_error(ckpt)


def test_error_integer_dtype(ckpt):
    key = "language_model.model.norm.weight"
    edit_shard(shard_of(ckpt, key), lambda t: t.update({key: t[key].to(torch.int32)}))
    assert f"{key} in {shard_of(ckpt, key).name}: dtype I32" in load_error(ckpt)


def test_error_truncated_and_garbage_shards(ckpt):
    first = sorted(ckpt.glob("model-*.safetensors"))[0]
    data = first.read_bytes()
    first.write_bytes(data[: len(data) // 2])
    msg = load_error(ckpt)
    assert first.name in msg and "truncated or corrupt" in msg
    first.write_bytes(b"\xff" * 64)
    assert first.name in load_error(ckpt)


def test_error_zero_byte_shard_and_header_past_the_end(ckpt):
    first = sorted(ckpt.glob("model-*.safetensors"))[0]
    data = first.read_bytes()
    first.write_bytes(b"")
    assert f"{first.name}: not a readable safetensors file" in load_error(ckpt)
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 10 ** 9  # claims bytes the file does not have
    raw = json.dumps(header).encode()
    first.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + header_len:])
    assert f"{first.name}: not a readable safetensors file" in load_error(ckpt)


@pytest.mark.parametrize("index, message", [
    ([1, 2], "not a valid safetensors index"),
    ({"weight_map": ["a"]}, "'weight_map' must map tensor names to file names"),
    ({"weight_map": {"x": "../outside.safetensors"}}, "plain names inside the checkpoint directory"),
    ({"weight_map": {"x": "/etc/passwd"}}, "plain names inside the checkpoint directory"),
])
def test_error_malformed_index(ckpt, index, message):
    (ckpt / INDEX_NAME).write_text(json.dumps(index))
    assert message in load_error(ckpt)


def test_error_index_names_missing_file(ckpt):
    index = json.loads((ckpt / INDEX_NAME).read_text())
    key = "language_model.lm_head.weight"
    index["weight_map"][key] = "model-00009-of-00009.safetensors"
    (ckpt / INDEX_NAME).write_text(json.dumps(index))
    assert "model-00009-of-00009.safetensors: missing (named in model.safetensors.index.json)" in load_error(ckpt)


def test_error_no_weights(ckpt):
    for f in [*ckpt.glob("*.safetensors"), ckpt / INDEX_NAME]:
        f.unlink()
    assert f"neither {INDEX_NAME} nor model.safetensors found" in load_error(ckpt)
