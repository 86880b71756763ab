"""Image processor, tokenizer, chat format and processor: hand-computed cases and the spec's rules written out."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from kimivl import (CheckpointError, InputError, KimiTokenizer, KimiVLForConditionalGeneration, KimiVLImageProcessor,
                    KimiVLProcessor)
from kimivl.tokenizer import PAT_STR, render_chat
from kimivl.processing import load_image
from weights_tools.tiny_tokenizer import CHAT_TEMPLATE

SPEC_EXAMPLE = ("<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|><|im_user|>user<|im_middle|>"
                "<|media_start|>image<|media_content|><|media_pad|><|media_end|>Describe the image<|im_end|>"
                "<|im_assistant|>assistant<|im_middle|>")


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint) -> KimiTokenizer:
    return KimiTokenizer.from_pretrained(tiny_checkpoint())


@pytest.fixture(scope="module")
def processor(tiny_checkpoint) -> KimiVLProcessor:
    return KimiVLProcessor.from_pretrained(tiny_checkpoint())


def gradient_image(w: int, h: int) -> Image.Image:
    """Every pixel different: channel values from its position."""
    x = torch.arange(w).repeat(h, 1)
    y = torch.arange(h)[:, None].repeat(1, w)
    rgb = torch.stack([x * 7 % 256, y * 5 % 256, (x + y) * 3 % 256], dim=-1).to(torch.uint8)
    return Image.fromarray(rgb.numpy())


# ---- image processor -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, limit, expected", [
    ((1000, 1000), 4096, (901, 901)),  # 71*71 = 5041 patches > 4096: scale by sqrt(4096/5041)
    ((300, 200), 64, (139, 93)),  # 21*14 = 294 > 64: scale by sqrt(64/294)
    ((2000, 1000), 4096, (1274, 637)),
    ((896, 896), 4096, (896, 896)),  # exactly 64*64 = 4096 patches: kept
    ((20, 10), 4096, (20, 10)),  # small images are never upscaled
])
def test_resize_rule(size, limit, expected):
    assert KimiVLImageProcessor(in_token_limit=limit).target_size(*size) == expected


def test_resize_uses_pil_bicubic_then_pads_and_patchifies():
    proc = KimiVLImageProcessor(in_token_limit=64, image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.25, 0.3))
    img = gradient_image(300, 200)
    patches, grid = proc.preprocess_one(img)
    resized = img.resize((139, 93), Image.Resampling.BICUBIC)
    # written out from spec 6: pad right/bottom with black to multiples of 28, /255, normalise, patchify row-major
    canvas = torch.zeros(3, 112, 140)
    canvas[:, :93, :139] = torch.from_numpy(np.array(resized)).permute(2, 0, 1).float() / 255
    canvas = (canvas - torch.tensor([0.5, 0.4, 0.3])[:, None, None]) / torch.tensor([0.2, 0.25, 0.3])[:, None, None]
    assert grid == (8, 10)
    expected = torch.stack([canvas[:, 14 * r:14 * r + 14, 14 * c:14 * c + 14] for r in range(8) for c in range(10)])
    torch.testing.assert_close(patches, expected, rtol=0, atol=1e-6)


def test_output_shapes_and_padding_values():
    proc = KimiVLImageProcessor(image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    out = proc([Image.new("RGB", (30, 20), (255, 0, 255)), Image.new("RGB", (56, 56), (0, 0, 0))])
    assert out["image_grid_hws"].tolist() == [[2, 4], [4, 4]]  # 30x20 pads to 56x28
    assert out["pixel_values"].shape == (8 + 16, 3, 14, 14) and out["pixel_values"].dtype == torch.float32
    first = out["pixel_values"][:8].view(2, 4, 3, 14, 14)
    assert first[0, 0, :, 0, 0].tolist() == [1.0, -1.0, 1.0]  # the image: (255/255 - .5)/.5
    assert first[0, 2, :, 0, 1].tolist() == [1.0, -1.0, 1.0]  # x = 29: the image's last column
    assert first[0, 2, :, 0, 2].tolist() == [-1.0, -1.0, -1.0]  # x = 30: right padding, black
    assert first[1, 0, :, 5, 0].tolist() == [1.0, -1.0, 1.0] and first[1, 0, :, 6, 0].tolist() == [-1.0] * 3


def test_every_input_kind_gives_the_same_patches(tmp_path):
    img = gradient_image(45, 33)
    path = tmp_path / "img.png"
    img.save(path)
    proc = KimiVLImageProcessor()
    ref, grid = proc.preprocess_one(img)
    for source in (path, str(path), path.read_bytes(), np.asarray(img)):
        patches, g = proc.preprocess_one(source)
        assert g == grid
        assert torch.equal(patches, ref)


def test_exif_orientation_ignored_as_published_unless_asked():
    """The published processor takes the pixels as stored (a JPEG tagged orientation 6 gives grid [4, 6] there);
    exif_orientation=True turns it upright first."""
    img = gradient_image(60, 30)
    exif = img.getexif()
    exif[0x0112] = 6  # stored sideways: viewers rotate 90 degrees clockwise
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    # 60 wide x 30 high -> padded to 84 x 56 -> 4 rows x 6 columns; turned upright: 30 x 60 -> 6 rows x 4 columns
    assert KimiVLImageProcessor().preprocess_one(buf.getvalue())[1] == (4, 6)
    assert KimiVLImageProcessor(exif_orientation=True).preprocess_one(buf.getvalue())[1] == (6, 4)
    assert load_image(buf.getvalue()).size == (60, 30) and load_image(buf.getvalue(), True).size == (30, 60)


def palette_image(w: int, h: int) -> Image.Image:
    img = Image.fromarray((np.arange(w * h).reshape(h, w) % 16).astype(np.uint8), mode="L").convert("P")
    img.putpalette([v for i in range(256) for v in (i * 13 % 256, 255 - i * 7 % 256, (40 + i) % 256)])
    return img


@pytest.mark.parametrize("make", [
    lambda: gradient_image(300, 200).convert("RGBA"),
    lambda: Image.merge("RGBA", (*gradient_image(300, 200).split(), gradient_image(300, 200).split()[1])),
    lambda: gradient_image(300, 200).convert("LA"),
    lambda: gradient_image(300, 200).convert("L"),
    lambda: gradient_image(300, 200).convert("1"),
    lambda: palette_image(300, 200),
    lambda: gradient_image(300, 200).convert("CMYK"),
], ids=["RGBA", "RGBA-alpha", "LA", "L", "1", "P", "CMYK"])
def test_modes_resize_and_pad_in_source_mode_then_rgb(make):
    """Spec 6 order: resize and zero-pad in the image's own mode, then convert("RGB") (so P and 1 resize nearest,
    alpha is premultiplied while resizing, and CMYK padding comes out white)."""
    img = make()
    proc = KimiVLImageProcessor(in_token_limit=64, image_mean=(0,) * 3, image_std=(1,) * 3)
    patches, grid = proc.preprocess_one(img)
    assert grid == (8, 10)
    expected = np.array(img.resize((139, 93), Image.Resampling.BICUBIC).crop((0, 0, 140, 112)).convert("RGB"))
    canvas = patches.view(8, 10, 3, 14, 14).permute(2, 0, 3, 1, 4).reshape(3, 112, 140)
    torch.testing.assert_close(canvas, torch.from_numpy(expected).permute(2, 0, 1).float() / 255, rtol=0, atol=1e-6)


def test_cmyk_padding_is_white_as_officially():
    patches, _ = KimiVLImageProcessor(image_mean=(0,) * 3, image_std=(1,) * 3).preprocess_one(
        Image.new("CMYK", (20, 20), (0, 0, 0, 255)))
    assert patches[0, :, 0, 0].tolist() == [0.0] * 3 and patches[0, :, 0, 13].tolist() == [0.0] * 3
    assert patches[1, :, 0, 13].tolist() == [1.0] * 3  # x = 27: padding


def test_deep_and_float_grayscale_are_scaled_not_clipped():
    proc = KimiVLImageProcessor(image_mean=(0,) * 3, image_std=(1,) * 3)
    deep = Image.new("I;16", (28, 28), 32768)  # mid grey in 16 bits -> 128 in 8 bits, not clipped to white
    assert torch.allclose(proc.preprocess_one(deep)[0][0, :, 0, 0], torch.full((3,), 128 / 255))
    flt = Image.new("F", (28, 28), 0.25)
    assert torch.allclose(proc.preprocess_one(flt)[0][0, :, 0, 0], torch.full((3,), 64 / 255), atol=1 / 255)


def test_bad_images_raise_clear_errors(tmp_path, monkeypatch):
    proc = KimiVLImageProcessor()
    with pytest.raises(InputError, match=r"^image file not found: .*missing.png$"):
        proc.preprocess_one(tmp_path / "missing.png")
    with pytest.raises(InputError, match=r"is a directory, not an image file$"):
        proc.preprocess_one(tmp_path)
    with pytest.raises(InputError, match=r"^cannot use an array of float32 \[4, 4, 3\] as an image: give uint8"):
        proc.preprocess_one(np.zeros((4, 4, 3), np.float32))
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="cannot decode image .*garbage.png"):
        proc.preprocess_one(tmp_path / "garbage.png")
    with pytest.raises(InputError, match="cannot decode image <19 bytes>"):
        proc.preprocess_one(b"not an image at all")
    with pytest.raises(InputError, match="empty"):
        proc.preprocess_one(Image.new("RGB", (0, 10)))
    with pytest.raises(InputError, match="^cannot use <dict> as an image"):
        proc.preprocess_one({"x": 1})
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 pixels is now a bomb
    with pytest.raises(InputError, match="decompression bomb"):
        proc.preprocess_one(tmp_path / "big.png")


def test_grid_beyond_the_position_table_is_refused():
    with pytest.raises(InputError, match="516 patch grid|2x516"):
        KimiVLImageProcessor().preprocess_one(Image.new("RGB", (7200, 14)))


def test_settings_come_from_preprocessor_config(tiny_checkpoint, tmp_path):
    proc = KimiVLImageProcessor.from_pretrained(tiny_checkpoint())
    assert proc.image_mean == (0.5, 0.5, 0.5) and proc.image_std == (0.5, 0.5, 0.5) and proc.in_token_limit == 4096
    assert KimiVLImageProcessor.from_pretrained(tmp_path).image_mean == (0.48145466, 0.4578275, 0.40821073)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"in_token_limit": 16384, "image_mean": [0, 0, 0]}))
    proc = KimiVLImageProcessor.from_pretrained(tmp_path)
    assert proc.in_token_limit == 16384 and proc.image_mean == (0, 0, 0)


# ---- tokenizer -----------------------------------------------------------------------------------------------
TEXTS = ["Hello world!", "The answer is 12345.", "你好world, café naïve 🙂", "line one\n\n  line two\t\tend ",
         "I'm sure it's THEY'LL", "", "   ", "x" * 3 + " " * 30_000 + "y"]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trip_and_pre_tokenisation(tokenizer, text):
    import regex  # the tiktoken pattern syntax (class intersection) needs the V1 flavour of `regex`

    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    if len(text) < 1000:  # the regex split written out: BPE runs inside each piece, never across pieces
        pieces = regex.findall(PAT_STR, text, flags=regex.V1)
        assert "".join(pieces) == text
        assert ids == [i for piece in pieces for i in tokenizer.encoding.encode_ordinary(piece)]


def test_special_tokens(tokenizer):
    n = tokenizer.num_base_tokens
    assert (n, tokenizer.vocab_size) == (1024, 1280)
    assert tokenizer.token_id("<|media_pad|>") == n + 21 and tokenizer.token_id("<|im_end|>") == n + 2
    assert tokenizer.token_id("<|reserved_token_1029|>") == 1029  # unnamed ids keep their reserved name
    assert tokenizer.stop_ids == [n + 1, n + 2] and tokenizer.pad_id == n + 255
    ids = tokenizer.encode("a<|im_end|>b")
    assert ids[1] == n + 2 and len(ids) == 3
    assert n + 2 not in tokenizer.encode("a<|im_end|>b", allow_special=False)
    assert tokenizer.decode(ids) == "a<|im_end|>b"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab"
    with pytest.raises(InputError, match="outside the vocabulary"):
        tokenizer.decode([5000])
    with pytest.raises(InputError, match="no special token"):
        tokenizer.token_id("<|nope|>")


def test_processor_without_tokenizer_config_says_so(tiny_checkpoint, tmp_path):
    shutil.copy(f"{tiny_checkpoint()}/tiktoken.model", tmp_path)
    with pytest.raises(CheckpointError, match=f"^{tmp_path}: the tokenizer names no <\\|media_pad\\|>.*"
                                              "tokenizer_config.json is missing"):
        KimiVLProcessor.from_pretrained(tmp_path)


def test_tokenizer_file_errors(tiny_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="no tiktoken.model"):
        KimiTokenizer.from_pretrained(tmp_path)
    shutil.copy(f"{tiny_checkpoint()}/tiktoken.model", tmp_path)
    with open(tmp_path / "tiktoken.model", "a") as f:
        f.write("not-base64!! seven\n")
    with pytest.raises(CheckpointError, match="line 1025 is not"):
        KimiTokenizer.from_pretrained(tmp_path)
    shutil.copy(f"{tiny_checkpoint()}/tiktoken.model", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="tokenizer_config.json is not valid JSON"):
        KimiTokenizer.from_pretrained(tmp_path)


# ---- chat format ---------------------------------------------------------------------------------------------
CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "image", "image": "x.png"},
                                  {"type": "text", "text": "Describe the image"}]}],
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": [
         {"type": "text", "text": "and these? "}, {"type": "image"}, {"type": "image"},
         {"type": "text", "text": "!"}]}],
    [{"role": "user", "content": "a\nb {{ not jinja }}"}, {"role": "assistant", "content": ""}],
]


def test_builtin_chat_format_matches_the_spec_example():
    assert render_chat(CONVERSATIONS[0]) == SPEC_EXAMPLE
    assert render_chat(CONVERSATIONS[1], add_generation_prompt=False) == (
        "<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|><|im_user|>user<|im_middle|>hi<|im_end|>")
    assert render_chat(CONVERSATIONS[2]).startswith("<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>")


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("gen", [True, False])
def test_jinja_copy_agrees_with_builtin(tokenizer, conv, gen):
    assert tokenizer.chat_template == CHAT_TEMPLATE  # the tiny checkpoint ships chat_template.jinja
    assert tokenizer.apply_chat_template(conv, gen) == render_chat(conv, gen)


def test_checkpoint_template_is_used(tiny_checkpoint, tmp_path):
    shutil.copy(f"{tiny_checkpoint()}/tiktoken.model", tmp_path)
    config = json.loads(open(f"{tiny_checkpoint()}/tokenizer_config.json").read())
    config["chat_template"] = "{% for m in messages %}[{{ m['role'] }}]{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = KimiTokenizer.from_pretrained(tmp_path)
    assert tok.apply_chat_template(CONVERSATIONS[2]) == "[system][user][assistant][user]"


def test_checkpoint_template_features_and_errors(tiny_checkpoint, tmp_path):
    shutil.copy(f"{tiny_checkpoint()}/tiktoken.model", tmp_path)
    config = json.loads(open(f"{tiny_checkpoint()}/tokenizer_config.json").read())
    config["chat_template"] = ("{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{{ m['role'] }};"
                               "{% endfor %}{% if messages[-1]['role'] == 'assistant' %}"
                               "{{ raise_exception('last message is the assistant') }}{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = KimiTokenizer.from_pretrained(tmp_path)
    assert tok.apply_chat_template(CONVERSATIONS[2]) == "system;user;"  # loop controls work
    with pytest.raises(InputError, match="refused the conversation: last message is the assistant"):
        tok.apply_chat_template(CONVERSATIONS[3])
    config["chat_template"] = "{{ messages[0]['content'] | nosuchfilter }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="chat template does not parse"):
        KimiTokenizer.from_pretrained(tmp_path).apply_chat_template(CONVERSATIONS[1])


@pytest.mark.parametrize("bad, match", [
    ([], "empty"), ([{"role": "tool", "content": "x"}], "role 'tool'"), ([{"content": "x"}], "'role' and 'content'"),
    ([{"role": "user", "content": [{"type": "video"}]}], "expected"), ([{"role": "user", "content": 3}], "string or"),
])
def test_bad_messages(tokenizer, bad, match):
    with pytest.raises(InputError, match=match):
        tokenizer.apply_chat_template(bad)


# ---- processor -----------------------------------------------------------------------------------------------
def test_processor_expands_media_pad_per_image(processor):
    img = Image.new("RGB", (84, 56))  # 6 x 4 patches -> 6 tokens
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Describe"}]}]
    out = processor(msgs)
    ids = out.input_ids[0].tolist()
    pad = processor.media_pad_id
    assert ids.count(pad) == 6 and out.image_grid_hws.tolist() == [[4, 6]]
    first = ids.index(pad)
    assert ids[first - 1] == processor.tokenizer.token_id("<|media_content|>")
    assert ids[first + 6] == processor.tokenizer.token_id("<|media_end|>")
    assert processor.decode(ids, skip_special_tokens=False) == SPEC_EXAMPLE.replace(
        "<|media_pad|>", "<|media_pad|>" * 6).replace("Describe the image", "Describe")
    assert out.attention_mask.tolist() == [[1] * len(ids)]
    same = processor(text=processor.apply_chat_template(msgs), images=[img])
    assert all(torch.equal(same[k], out[k]) for k in out)


def test_batch_is_left_padded(processor):
    a, b = Image.new("RGB", (28, 28), "red"), Image.new("RGB", (56, 84), "blue")
    batch = [[{"role": "user", "content": [{"type": "image", "image": a}, {"type": "image", "image": b},
                                           {"type": "text", "text": "compare"}]}],
             [{"role": "user", "content": "no image here, a longer text " * 3}],
             [{"role": "user", "content": [{"type": "image", "image": b}, {"type": "text", "text": "?"}]}]]
    out = processor(batch)
    singles = [processor(conv) for conv in batch]
    width = max(s.input_ids.shape[1] for s in singles)
    assert out.input_ids.shape == (3, width)
    for row, single in enumerate(singles):
        n = single.input_ids.shape[1]
        assert out.input_ids[row, width - n:].tolist() == single.input_ids[0].tolist()
        assert out.input_ids[row, :width - n].eq(processor.tokenizer.pad_id).all()
        assert out.attention_mask[row].tolist() == [0] * (width - n) + [1] * n
    assert out.image_grid_hws.tolist() == [[2, 2], [6, 4], [6, 4]]
    assert out.pixel_values.shape[0] == 4 + 24 + 24


def test_image_count_mismatch_and_missing_images(processor, tmp_path):
    img = Image.new("RGB", (28, 28))
    two = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "x"}]}]
    with pytest.raises(InputError, match="2 image slots in the prompt but 1 images given"):
        processor(two, images=[img])
    with pytest.raises(InputError, match="1 image slots in the prompt but 2 images given"):
        processor([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}], images=[img, img])
    with pytest.raises(InputError, match="image item 0 has no image"):
        processor(two)
    with pytest.raises(InputError, match="not found"):
        processor([{"role": "user", "content": [{"type": "image", "image": tmp_path / "nope.jpg"}]}])
    with pytest.raises(InputError, match="empty"):
        processor(text="")
    with pytest.raises(InputError, match="no conversations"):
        processor([])
    with pytest.raises(InputError, match="no prompts"):
        processor(text=[])


def test_processor_output_runs_through_the_model(tiny_checkpoint, processor):
    model = KimiVLForConditionalGeneration.from_pretrained(tiny_checkpoint())
    msgs = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (50, 70), "green")},
                                         {"type": "text", "text": "colour?"}]}]
    out = model(**processor(msgs))
    assert torch.isfinite(out.logits).all()
