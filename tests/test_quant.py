"""Weight-only quantization: the format (hand-computed cases and the compressed-tensors library itself), every
product path against the dequantize-then-matmul reference, quantized loading against the float model with the same
rounded weights, and the compressed checkpoint writer."""

from __future__ import annotations

import json

import pytest
import torch

from kimivl import quant as Q
from kimivl.checkpoint import read_layout
from kimivl.errors import CheckpointError, InputError
from kimivl.kernels import quant as K
from kimivl.model import KimiVLForConditionalGeneration
from tests.helpers import rel_err
from weights_tools.__main__ import main as weights_main
from weights_tools.quantize import quantize_checkpoint
from weights_tools.verify import verify

BF16_FAST = K.cpu_bf16_fast()


def test_int8_hand_computed():
    w = torch.tensor([[1.0, -2.0, 0.25, 0.0]])
    data, scale = K.quantize(w, 8, None)
    # amax 2 / 127.5 = 0.0156863 = 2^-6 * 1.00392, rounded to bfloat16's 7 fraction bits: 2^-6 * 129/128
    step = 2 ** -6 * 129 / 128
    assert scale.dtype == torch.bfloat16 and scale.tolist() == [step]
    # 1 / step = 63.50 -> 64; -2 / step = -127.01 -> -127; 0.25 / step = 15.88 -> 16
    assert data.tolist() == [[64, -127, 16, 0]]
    assert K.dequantize(data, scale, 8).tolist() == [[64 * step, -127 * step, 16 * step, 0.0]]


def test_int4_hand_computed():
    w = torch.tensor([[0.7, -1.5, 0.1, 0.0]])
    data, scale = K.quantize(w, 4, 4)
    # amax 1.5 / 7.5 = 0.2 -> bfloat16 0.2001953125; q = round(3.497, -7.493, 0.4995, 0) = (3, -7, 0, 0)
    assert scale.tolist() == [[0.2001953125]]
    assert K.unpack_int4(data).tolist() == [[3, -7, 0, 0]]
    # stored + 8, the even element in the low nibble: (11 | 1 << 4), (8 | 8 << 4)
    assert data.tolist() == [[27, 136]]


def test_formats_match_compressed_tensors_packing():
    import compressed_tensors.compressors.pack_quantized.helpers as ct
    q4 = torch.randint(-8, 8, (48, 64), dtype=torch.int8)
    q8 = torch.randint(-128, 128, (48, 64), dtype=torch.int8)
    for q, bits, data in ((q4, 4, K.pack_int4(q4)), (q8, 8, q8)):
        words = Q.pack_int32(data, bits)
        assert torch.equal(words, ct.pack_to_int32(q, bits))
        assert torch.equal(ct.unpack_from_int32(words, bits, q.shape), q)
        assert torch.equal(Q.unpack_int32(words, bits), data)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 128)])
def test_quantization_error_within_half_a_step(bits, group):
    w = torch.randn(64, 256) * 0.02
    w[3] = 0  # an all-zero row stays zero
    data, scale = K.quantize(w, bits, group)
    deq = K.dequantize(data, scale, bits)
    step = scale.float() if bits == 8 else scale.float().repeat_interleave(group, dim=-1)
    step = step[:, None] if bits == 8 else step
    # within half a step everywhere: the bfloat16 scale is never rounded below amax / (qmax + 0.5), so nothing clips
    assert ((w - deq).abs() <= 0.5 * step * (1 + 1e-6)).all()
    assert deq[3].abs().max() == 0
    assert 0.001 < rel_err(deq, w) < (0.01 if bits == 8 else 0.15)


def _weight(bits, group, layout, N=96, Kw=256):
    data, scale = K.quantize(torch.randn(N, Kw) * 0.05, bits, group)
    if layout == "cpu-int4":
        data, scale = K.to_cpu_int4(data, scale)
    return K.QuantWeight(data, scale, bits, group, (N, Kw), layout)


PATHS = [(8, None, "canonical"), (4, 32, "canonical"), (4, 128, "canonical")] + (
    [(4, 32, "cpu-int4"), (4, 128, "cpu-int4")] if BF16_FAST else [])


@pytest.mark.parametrize("bits,group,layout", PATHS)
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_quant_matmul_paths_match_reference(bits, group, layout, rows):
    """Every product path (torch's int8 / int4 CPU kernels for few rows on a fast-bfloat16 CPU, blocks dequantized to
    bfloat16 or the activations' dtype otherwise) against float32 x @ dequantize(W)^T. x is rounded to bfloat16 first
    (what the kernels read); what remains is the bfloat16 rounding of the kernels' output or of the bfloat16 GEMM's
    (2^-8 of the largest entry)."""
    w = _weight(bits, group, layout)
    x = torch.randn(rows, 256).bfloat16().float()
    out, ref = K.quant_matmul(x, w), K.quant_matmul_reference(x, w)
    assert out.shape == (rows, 96) and out.dtype == torch.float32
    assert rel_err(out, ref) < (2 ** -8 if BF16_FAST else 1e-6)


def test_int8_widths_the_kernel_cannot_read_take_the_generic_path():
    """torch's int8 kernel reads past the row unless the input width is a multiple of 16 (24 gave NaN or 1e32)."""
    w = _weight(8, None, "canonical", N=64, Kw=24)
    for rows in (1, 5):
        x = torch.randn(rows, 24).bfloat16().float()
        assert rel_err(K.quant_matmul(x, w), K.quant_matmul_reference(x, w)) < 2 ** -8


def test_generic_path_is_exact_without_fast_bfloat16(monkeypatch):
    """Where the CPU has no fast bfloat16 (AVX2), both schemes dequantize to float32: the reference, up to summation
    order; and blocks of DEQUANT_ROWS rows cover the whole output."""
    monkeypatch.setattr(K, "cpu_bf16_fast", lambda: False)
    monkeypatch.setattr(K, "DEQUANT_ROWS", 40)  # 96 rows: blocks of 40, 40, 16 for many input rows
    monkeypatch.setattr(K, "FEW_ROWS_BLOCK", 64)  # and of 64, 32 for few
    for bits, group in ((8, None), (4, 32)):
        w = _weight(bits, group, "canonical")
        for x in (torch.randn(3, 7, 256), torch.randn(2, 256)):
            assert rel_err(K.quant_matmul(x, w), K.quant_matmul_reference(x, w)) < 1e-6


@pytest.mark.skipif(not BF16_FAST, reason="the int4 CPU kernel layout is used only on CPUs with fast bfloat16")
def test_cpu_int4_layout_round_trips_exactly(monkeypatch):
    data, scale = K.quantize(torch.randn(192, 512), 4, 64)
    held = K.to_cpu_int4(data, scale)
    back = K.from_cpu_int4(*held, 64)
    assert torch.equal(back[0], data) and torch.equal(back[1], scale)
    monkeypatch.setattr(K, "CONVERT_ROWS", 64)  # blocks of rows convert to the same bytes as the whole
    assert torch.equal(K.to_cpu_int4(data, scale)[0], held[0])
    # quantizing straight into the layout (what loading does) gives the same bytes as quantize, then convert
    w = torch.randn(192, 512)
    direct, converted = K.quantize_in_layout(w, 4, 64, "cpu-int4"), K.to_cpu_int4(*K.quantize(w, 4, 64))
    assert torch.equal(direct[0], converted[0]) and torch.equal(direct[1], converted[1])


def _fake_quantized(path: str, scheme: Q.Scheme) -> KimiVLForConditionalGeneration:
    """The float model with every weight the quantized model holds replaced by its dequantized value: what the
    quantized model must compute."""
    model = KimiVLForConditionalGeneration.from_pretrained(path)
    int8 = Q.Scheme(8, None)
    with torch.no_grad():
        for name, p in model.language_model.named_parameters():
            full = f"language_model.{name}"
            if full in Q.INT8_ROWS:
                p.copy_(Q.round_trip(p, int8))
            elif Q.TARGET.fullmatch(full) or name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.copy_(Q.round_trip(p, scheme))
    return model


@pytest.mark.parametrize("name,group", [("int8", None), ("int4", 32)])
def test_quantized_model_equals_float_model_with_rounded_weights(tiny_checkpoint, monkeypatch, name, group):
    """Loading with quantize= places every quantized tensor where it belongs: with the exact float32 product path,
    logits and greedy tokens equal those of the float model holding the same rounded weights."""
    monkeypatch.setattr(K, "cpu_bf16_fast", lambda: False)
    path = tiny_checkpoint()
    model = KimiVLForConditionalGeneration.from_pretrained(path, quantize=name, group_size=group)
    scheme = Q.Scheme.named(name, group)
    assert model.quantization == scheme
    assert isinstance(model.language_model.lm_head, Q.QuantLinear) and model.language_model.lm_head.bits == 8
    assert isinstance(model.language_model.model.layers[1].mlp.experts, Q.QuantExperts)
    assert not isinstance(model.language_model.model.layers[1].self_attn.kv_b_proj, Q.QuantLinear)
    fake = _fake_quantized(path, scheme)
    ids = torch.randint(0, 1000, (2, 11))
    assert rel_err(model(ids).logits, fake(ids).logits) < 1e-5
    assert torch.equal(model.generate(ids, max_new_tokens=6), fake.generate(ids, max_new_tokens=6))
    # memory: 1 byte a weight + a bfloat16 scale a row (int8, lm_head, embedding), 1/2 byte + a bfloat16 scale a
    # group (int4), float32 for the rest (kv_b_proj, routers, norms)
    expected = 0
    for pname, p in fake.language_model.named_parameters():
        full = f"language_model.{pname}"
        quantized = Q.TARGET.fullmatch(full) and "kv_b_proj" not in pname or "experts." in pname
        if full in Q.INT8_ROWS or quantized and scheme.bits == 8:
            expected += p.numel() + p.numel() // p.shape[-1] * 2
        elif quantized:
            expected += p.numel() // 2 + p.numel() // group * 2
        else:
            expected += p.numel() * 4
    assert Q.quantized_bytes(model.language_model) == expected


@pytest.mark.skipif(not BF16_FAST, reason="the kernels run only on CPUs with fast bfloat16")
@pytest.mark.parametrize("preset,name,group", [("tiny", "int8", None), ("tiny", "int4", 32),
                                               ("tiny-qlora", "int8", None)])  # q_b_proj 24 wide: not a kernel width
def test_quantized_model_on_the_fast_kernels_stays_close(tiny_checkpoint, preset, name, group):
    """The same comparison through torch's int8 / int4 kernels, with bfloat16 activations: logits within 3% (the
    tiny random model's logits move by ~1% when its activations are rounded to bfloat16)."""
    path = tiny_checkpoint(preset)
    model = KimiVLForConditionalGeneration.from_pretrained(path, quantize=name, group_size=group)
    assert any(m.layout == "cpu-int4" for m in model.modules() if isinstance(m, Q.QuantLinear)) == (name == "int4")
    ids = torch.randint(0, 1000, (2, 11))
    assert rel_err(model(ids).logits, _fake_quantized(path, Q.Scheme.named(name, group))(ids).logits) < 0.03


def test_quantize_model_in_memory_equals_quantizing_while_loading(tiny_checkpoint):
    path = tiny_checkpoint()
    a = Q.quantize_model(KimiVLForConditionalGeneration.from_pretrained(path), Q.Scheme(4, 32))
    b = KimiVLForConditionalGeneration.from_pretrained(path, quantize="int4", group_size=32)
    ids = torch.randint(0, 1000, (1, 9))
    assert torch.equal(a(ids).logits, b(ids).logits)
    with pytest.raises(InputError, match="already quantized"):
        Q.quantize_model(a, Q.Scheme(8, None))


def test_load_refuses_bad_schemes(tiny_checkpoint):
    path = tiny_checkpoint()
    with pytest.raises(InputError, match="one of int8, int4"):
        KimiVLForConditionalGeneration.from_pretrained(path, quantize="int3")
    with pytest.raises(InputError, match="group size must be one of"):
        KimiVLForConditionalGeneration.from_pretrained(path, quantize="int4", group_size=48)
    # the tiny model's experts are 32 wide: groups of 128 do not divide them, and the error says what does
    with pytest.raises(InputError, match=r"input widths \[32, 64\]; use a group size of 32"):
        KimiVLForConditionalGeneration.from_pretrained(path, quantize="int4")


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, tiny_checkpoint):
    out = tmp_path_factory.mktemp("q") / "tiny-int4"
    quantize_checkpoint(tiny_checkpoint(), out, "int4", group_size=32, max_shard_size="300KB")
    return out


def test_compressed_checkpoint_loads_as_quantizing_while_loading(tiny_checkpoint, compressed):
    assert verify(compressed) == []
    assert len(list(compressed.glob("model-*.safetensors"))) > 1  # sharded, with an index
    for f in ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json"):
        assert (compressed / f).is_file()
    a = KimiVLForConditionalGeneration.from_pretrained(compressed)
    b = KimiVLForConditionalGeneration.from_pretrained(tiny_checkpoint(), quantize="int4", group_size=32)
    assert a.quantization == b.quantization == Q.Scheme(4, 32)
    ids = torch.randint(0, 1000, (1, 9))
    assert torch.equal(a(ids).logits, b(ids).logits)
    with pytest.raises(InputError, match="already quantized"):
        KimiVLForConditionalGeneration.from_pretrained(compressed, quantize="int8")


def test_compressed_tensors_library_reads_what_we_write(tiny_checkpoint, compressed):
    """The library itself parses the config and decompresses every quantized weight to what we dequantize (it
    computes q * scale in the scale's dtype, bfloat16, so ours is compared after the same rounding)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    qc = QuantizationConfig.model_validate(json.loads((compressed / "config.json").read_text())["quantization_config"])
    assert qc.format == "pack-quantized"
    scheme = qc.config_groups["group_0"]
    tensors = {}
    for f in compressed.glob("*.safetensors"):
        tensors.update(load_file(f))
    names = [k.removesuffix("_packed") for k in tensors if k.endswith("weight_packed")]
    assert sorted(names) == sorted(k for k in read_layout(tiny_checkpoint()).expected if Q.TARGET.fullmatch(k))
    assert any(".experts.7.down_proj" in n for n in names) and any("kv_b_proj" in n for n in names)
    for name in names:
        local = {p: tensors[name + p[len("weight"):]] for p in ("weight_packed", "weight_scale", "weight_shape")}
        theirs = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        ours = K.dequantize(Q.unpack_int32(local["weight_packed"], 4), local["weight_scale"], 4)
        assert theirs.dtype == torch.bfloat16 and torch.equal(theirs, ours.to(torch.bfloat16)), name


def test_writer_refuses_widths_before_writing_and_convert_keeps_the_packed_tensors(tiny_checkpoint, compressed,
                                                                                  tmp_path):
    with pytest.raises(InputError, match=r"not multiples of 128; use --group-size 32"):
        quantize_checkpoint(tiny_checkpoint(), tmp_path / "g128", "int4")
    assert not (tmp_path / "g128").exists() and not list(tmp_path.glob(".*"))
    from safetensors.torch import load_file
    from weights_tools.rewrite import convert
    out = convert(compressed, tmp_path / "bf16", "bfloat16")  # the float rest to bfloat16; words, scales as stored
    assert verify(out) == []
    before = {k: v for f in compressed.glob("*.safetensors") for k, v in load_file(f).items()}
    after = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    for k, v in before.items():
        if k.endswith(("_packed", "_scale", "_shape")):
            assert torch.equal(after[k], v), k
        else:
            assert after[k].dtype == torch.bfloat16 or k.endswith("e_score_correction_bias"), k
    KimiVLForConditionalGeneration.from_pretrained(out)


def test_int8_checkpoint_via_the_command(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "int8"
    assert weights_main(["quantize", tiny_checkpoint(), str(out), "--scheme", "int8"]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
    a = KimiVLForConditionalGeneration.from_pretrained(out)
    b = KimiVLForConditionalGeneration.from_pretrained(tiny_checkpoint(), quantize="int8")
    ids = torch.randint(0, 1000, (1, 9))
    assert torch.equal(a(ids).logits, b(ids).logits)
    assert weights_main(["quantize", tiny_checkpoint(), str(tmp_path / "x"), "--scheme", "int8",
                         "--group-size", "32"]) == 1
    assert weights_main(["quantize", str(out), str(tmp_path / "y"), "--scheme", "int8"]) == 1
    assert "already quantized" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_unreadable_quantization_config_is_refused(tiny_checkpoint, tmp_path):
    import shutil
    out = tmp_path / "marlin"
    shutil.copytree(tiny_checkpoint(), out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "marlin-24"}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not a quantization kimivl reads"):
        KimiVLForConditionalGeneration.from_pretrained(out)


def test_cli_generate_and_eval_with_quantize(tiny_checkpoint, tmp_path, capsys):
    """`--quantize` on generate answers as the API does with the same quantized model; on eval it is recorded, so
    resuming with another quantization is refused; a bad group size is a one-line error."""
    from kimivl import KimiVLProcessor, generate
    from kimivl.cli import main
    path = tiny_checkpoint()
    sample = "assets/sample.png"
    args = ["generate", "--model", path, "--image", sample, "--prompt", "What is in the image?",
            "--max-new-tokens", "8", "--no-stream", "--quantize", "int4", "--group-size", "32"]
    assert main(args) == 0
    msgs = [{"role": "user", "content": [{"type": "image", "image": sample},
                                         {"type": "text", "text": "What is in the image?"}]}]
    model = KimiVLForConditionalGeneration.from_pretrained(path, quantize="int4", group_size=32)
    assert capsys.readouterr().out == generate(model, KimiVLProcessor.from_pretrained(path), msgs,
                                               max_new_tokens=8) + "\n"
    assert main(args[:-2]) == 1  # int4 in groups of 128 does not fit the tiny model's 32-wide experts
    err = capsys.readouterr().err
    assert "use a group size of 32" in err and err.count("\n") == 1
    data = tmp_path / "s.tsv"
    assert main(["eval", "make-synthetic", str(data), "--n", "4"]) == 0
    run = ["eval", "--model", path, "--data", str(data), "--metric", "ocr", "--out", str(tmp_path / "e"),
           "--max-new-tokens", "4", "--no-progress"]
    assert main(run + ["--quantize", "int8"]) == 0
    assert '"quantize": "int8 (per channel)"' in (tmp_path / "e" / "run.json").read_text()
    capsys.readouterr()
    assert main(run) == 1  # the same folder, now unquantized: refused rather than mixed


def test_quantized_model_is_neither_saved_nor_trained(tiny_checkpoint, tmp_path):
    from kimivl.train.run import TrainConfig, prepare
    model = KimiVLForConditionalGeneration.from_pretrained(tiny_checkpoint(), quantize="int8")
    with pytest.raises(InputError, match="kimivl-weights quantize"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="finetune its float checkpoint"):
        prepare(model, TrainConfig(out=str(tmp_path / "run")))


def test_default_dtype_follows_the_cpu(monkeypatch):
    """dtype=None: the checkpoint's torch_dtype, except float32 on a CPU without fast bfloat16."""
    from kimivl.checkpoint import load_dtype
    from kimivl.config import KimiVLConfig
    bf16 = KimiVLConfig.preset("tiny")
    bf16.torch_dtype = "bfloat16"
    monkeypatch.setattr(K, "cpu_bf16_fast", lambda: True)
    assert load_dtype(None, "cpu", bf16) == torch.bfloat16 and load_dtype("float32", "cpu", bf16) == torch.float32
    monkeypatch.setattr(K, "cpu_bf16_fast", lambda: False)
    assert load_dtype(None, "cpu", bf16) == torch.float32
    assert load_dtype(None, "cpu", KimiVLConfig.preset("tiny")) == torch.float32  # a float32 checkpoint stays so
