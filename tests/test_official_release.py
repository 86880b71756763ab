"""Against the published Kimi-VL-A3B-Instruct release's own files in ../shared/official (tokenizer, chat template,
configs, generation config, the weight index): what loads, how text tokenizes, and that a checkpoint with the
release's tensor names loads."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
import torch

from kimivl import CheckpointError, KimiTokenizer, KimiVLConfig, KimiVLForConditionalGeneration, KimiVLProcessor
from kimivl.checkpoint import INDEX_NAME, expected_tensors, to_official, write_safetensors
from kimivl.generation import CheckpointGeneration
from kimivl.model import init_weights, parameter_counts
from kimivl.processing import KimiVLImageProcessor
from kimivl.tokenizer import render_chat
from weights_tools.inspection import inspect_checkpoint
from weights_tools.verify import verify

OFFICIAL = Path(__file__).resolve().parents[2] / "shared" / "official" / "kimi-vl-a3b-instruct"
pytestmark = pytest.mark.skipif(not OFFICIAL.is_dir(), reason=f"the release's files are not at {OFFICIAL}")
ROTARY = {f"language_model.model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(27)}


@pytest.fixture(scope="module")
def tok() -> KimiTokenizer:
    return KimiTokenizer.from_pretrained(OFFICIAL)


def file_ranks() -> dict[bytes, int]:
    """tiktoken.model read here independently: one `base64(token) rank` per line."""
    lines = (OFFICIAL / "tiktoken.model").read_bytes().splitlines()
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line.strip())}


def index() -> dict[str, str]:
    return json.loads((OFFICIAL / INDEX_NAME).read_text())["weight_map"]


# ---- tokenizer ----------------------------------------------------------------------------------------------------
def test_real_tokenizer_ids(tok):
    ranks = file_ranks()
    assert len(ranks) == tok.num_base_tokens == 163584 and tok.vocab_size == 163840
    named = {"[BOS]": 163584, "[EOS]": 163585, "<|im_end|>": 163586, "<|im_user|>": 163587,
             "<|im_assistant|>": 163588, "<|im_system|>": 163594, "<|im_middle|>": 163601,
             "<|media_start|>": 163602, "<|media_content|>": 163603, "<|media_end|>": 163604,
             "<|media_pad|>": 163605, "[PAD]": 163838, "[UNK]": 163839, "<|reserved_token_163590|>": 163590}
    assert {name: tok.token_id(name) for name in named} == named
    assert (tok.eos_id, tok.pad_id, tok.stop_ids) == (163585, 163838, [163585, 163586])
    assert tok.encode("Hello world") == [ranks[b"Hello"], ranks[b" world"]]
    assert tok.encode("你好") == [ranks["你好".encode()]]


@pytest.mark.parametrize("text", ["Hello, world!", "你好，世界。数学: 3.14159 × 2", "emoji 🙂 and\ttabs\n\nnew lines",
                                  "  several   spaces  ", "Ünïcödé façade — “quotes”", "x" * 30_000])
def test_real_tokenizer_round_trips(tok, text):
    ids = tok.encode(text)
    assert all(i < tok.num_base_tokens for i in ids)
    assert tok.decode(ids) == text


def test_think_markers_are_plain_text(tok):
    """The Thinking models' ◁think▷ / ◁/think▷ are ordinary text, not special tokens."""
    text = "◁think▷The user asks 2+2.◁/think▷4"
    ids = tok.encode(text)
    assert all(i < tok.num_base_tokens for i in ids) and tok.decode(ids) == text
    assert tok.encode("◁think▷")[-2:] == tok.encode("▷")[-2:]  # no token of its own


def test_long_runs_split_at_special_tokens_first(tok):
    """The published tokenizer cuts the prompt at special tokens before its 25,000-character run limit, so the
    template's characters do not count toward a user's run: 24,990 'b's as the user text give 6,264 ids there."""
    text = tok.apply_chat_template([{"role": "user", "content": "b" * 24990}])
    ids = tok.encode(text)
    assert len(ids) == 6264
    pieces = ["<|im_system|>", "system", "<|im_middle|>", "You are a helpful assistant", "<|im_end|>", "<|im_user|>",
              "user", "<|im_middle|>", "b" * 24990, "<|im_end|>", "<|im_assistant|>", "assistant", "<|im_middle|>"]
    assert ids == [i for p in pieces for i in ([tok.token_id(p)] if p.startswith(("<|", "[")) else tok.encode(p))]


def test_skip_special_tokens_drops_the_named_ones_only(tok):
    ids = [163590, 163586, *tok.encode("Hi"), 163605, 163838]
    assert tok.decode(ids) == "<|reserved_token_163590|><|im_end|>Hi<|media_pad|>[PAD]"
    assert tok.decode(ids, skip_special_tokens=True) == "<|reserved_token_163590|>Hi"


# ---- chat template ------------------------------------------------------------------------------------------------
CONVERSATIONS = {
    "text": ([{"role": "user", "content": "Hi"}],
             "<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>"
             "<|im_user|>user<|im_middle|>Hi<|im_end|><|im_assistant|>assistant<|im_middle|>"),
    "images": ([{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "What?"},
                                             {"type": "image", "image": "b.png"}]}],
               "<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|><|im_user|>user<|im_middle|>"
               "<|media_start|>image<|media_content|><|media_pad|><|media_end|>What?"
               "<|media_start|>image<|media_content|><|media_pad|><|media_end|><|im_end|>"
               "<|im_assistant|>assistant<|im_middle|>"),
    "multi-turn": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
                   "<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user<|im_middle|>2+2?<|im_end|>"
                   "<|im_assistant|>assistant<|im_middle|>4<|im_end|><|im_user|>user<|im_middle|>And 3+3?<|im_end|>"
                   "<|im_assistant|>assistant<|im_middle|>"),
}


@pytest.mark.parametrize("case", CONVERSATIONS)
def test_release_chat_template(tok, case):
    """The release's chat_template.jinja, rendered here, gives the format written out by hand, and the built-in
    rendering (used for checkpoints without a template) agrees with it."""
    messages, want = CONVERSATIONS[case]
    assert tok.chat_template == (OFFICIAL / "chat_template.jinja").read_text()
    assert tok.apply_chat_template(messages) == want == render_chat(messages)


def test_release_processor_expands_images(tmp_path):
    from PIL import Image

    processor = KimiVLProcessor.from_pretrained(OFFICIAL)
    image = Image.new("RGB", (100, 60), "red")  # padded to 112 x 84: 6 x 8 patches -> 12 merged tokens
    inputs = processor([{"role": "user", "content": [{"type": "image", "image": image},
                                                     {"type": "text", "text": "Colour?"}]}])
    ids = inputs.input_ids[0].tolist()
    assert inputs.image_grid_hws.tolist() == [[6, 8]]
    start = ids.index(163602)
    assert ids[start:start + 16] == [163602, *processor.tokenizer.encode("image"), 163603, *[163605] * 12, 163604]


# ---- configs ------------------------------------------------------------------------------------------------------
def test_release_configs_load():
    config = KimiVLConfig.from_json(OFFICIAL / "config.json")
    assert config.text_config == KimiVLConfig.preset("a3b").text_config.__class__(
        **{**vars(KimiVLConfig.preset("a3b").text_config), "extra": config.text_config.extra,
           "pad_token_id": 163839, "bos_token_id": 163584, "eos_token_id": 163585})
    assert config.vision_config.hidden_size == 1152 and config.media_placeholder_token_id == 163605
    image = KimiVLImageProcessor.from_pretrained(OFFICIAL)
    assert (image.in_token_limit, image.patch_size, image.pad_input, image.image_mean, image.image_std) == \
        (4096, 14, True, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert not image.exif_orientation
    gen = CheckpointGeneration.read(OFFICIAL)
    assert (gen.eos_token_ids, gen.pad_token_id) == ([163585], 163838)
    assert gen.sampling == {"temperature": 0.2, "top_k": 50, "top_p": 1.0}  # do_sample: transformers' defaults


# ---- weights ------------------------------------------------------------------------------------------------------
def test_index_names_are_the_config_names_plus_the_rotary_buffers():
    names = set(index())
    expected = set(expected_tensors(KimiVLConfig.from_json(OFFICIAL / "config.json")))
    assert len(names) == 5679 and names - expected == ROTARY and expected <= names


def write_release_layout(path: Path, config: KimiVLConfig, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """A checkpoint laid out as the release: its shard files and tensor names. With `tensors`, their data; without,
    headers only (bfloat16 parameters, float32 rotary buffers) over sparse files, for the real sizes."""
    path.mkdir()
    config.to_json(path / "config.json")
    shapes = expected_tensors(config) | {k: (config.text_config.qk_rope_head_dim // 2,) for k in ROTARY}
    files: dict[str, list[str]] = {}
    for name, f in index().items():
        files.setdefault(f, []).append(name)
    for f, names in files.items():
        if tensors is not None:
            write_safetensors(path / f, {k: tensors[k] for k in names})
            continue
        header, used = {}, 0
        for k in names:
            n = (4 if k in ROTARY else 2) * torch.Size(shapes[k]).numel()
            header[k] = {"dtype": "F32" if k in ROTARY else "BF16", "shape": list(shapes[k]),
                         "data_offsets": [used, used + n]}
            used += n
        raw = json.dumps(header).encode()
        with open(path / f, "wb") as out:
            out.write(len(raw).to_bytes(8, "little") + raw)
            out.truncate(8 + len(raw) + used)
    shutil.copy(OFFICIAL / INDEX_NAME, path / INDEX_NAME)


def test_release_layout_verifies_with_its_total_size(tmp_path):
    """Header-only, at full size: the release's names and shards, bf16 parameters and the 27 float32 rotary
    buffers add up to the index's total_size exactly; verify and inspect find nothing wrong and skip the buffers."""
    write_release_layout(tmp_path / "a3b", KimiVLConfig.from_json(OFFICIAL / "config.json"))
    shutil.copy(OFFICIAL / "config.json", tmp_path / "a3b" / "config.json")  # the release's own, auto_map and all
    assert verify(tmp_path / "a3b") == []
    summary = inspect_checkpoint(tmp_path / "a3b")
    assert summary["problems"] == 0 and summary["ignored"] == 27
    assert summary["parameters"]["total"]["total"] == parameter_counts(KimiVLConfig.preset("a3b"))["total"]


def tiny_release_config() -> KimiVLConfig:
    """The release's config (27 + 27 layers, 64 experts, its ids) at tiny widths."""
    config = KimiVLConfig.from_json(OFFICIAL / "config.json")
    v, t = config.vision_config, config.text_config
    v.hidden_size, v.num_attention_heads, v.intermediate_size = 32, 2, 48
    v.init_pos_emb_height = v.init_pos_emb_width = 8
    t.hidden_size, t.intermediate_size, t.moe_intermediate_size, t.num_attention_heads = 32, 64, 16, 2
    t.num_key_value_heads, t.kv_lora_rank, t.qk_nope_head_dim, t.qk_rope_head_dim, t.v_head_dim = 2, 16, 8, 8, 8
    config.validate()
    return config


def test_checkpoint_with_the_release_names_loads(tmp_path):
    """Real tensors under the release's names and shard files (rotary buffers included, with the wrong values on
    purpose: they are ignored) load into the same model, the router biases kept float32."""
    config = tiny_release_config()
    model = KimiVLForConditionalGeneration(config)
    init_weights(model, seed=0)
    tensors = to_official(model.state_dict()) | {k: torch.full((4,), 7.0) for k in ROTARY}
    write_release_layout(tmp_path / "ckpt", config, tensors)
    # float32 as written (the release config says bfloat16, which a fast-bfloat16 CPU would load by default)
    loaded = KimiVLForConditionalGeneration.from_pretrained(tmp_path / "ckpt", dtype="float32")
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)
    bias = loaded.language_model.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32
    (tmp_path / "ckpt" / "config.json").write_text(
        (tmp_path / "ckpt" / "config.json").read_text().replace('"n_routed_experts": 64', '"n_routed_experts": 32'))
    with pytest.raises(CheckpointError, match="unexpected tensor") as err:
        KimiVLForConditionalGeneration.from_pretrained(tmp_path / "ckpt")
    assert "rotary_emb" not in str(err.value)  # still ignored when other names are wrong
