"""From images and conversations to model inputs: the image processor (spec 6) and the processor that joins it with
the tokenizer and chat format (spec 5, 7)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import CheckpointError, InputError
from .fsutil import write_text_atomic
from .tokenizer import KimiTokenizer

MEDIA_PAD = "<|media_pad|>"


def _describe(image: Any) -> str:
    """A short name for an input in error messages."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, (bytes, bytearray)):
        return f"<{len(image)} bytes>"
    if getattr(image, "filename", ""):  # a PIL image opened from a file
        return str(image.filename)
    return f"<{type(image).__name__}>"


_WARNINGS = threading.Lock()


def load_image(image: Any, exif_orientation: bool = False, check_size=None) -> Image.Image:
    """A PIL image, in its own mode, from a PIL image, a path, encoded bytes or a uint8 [H, W] / [H, W, C] array.
    The pixels are taken as stored, as the published processor does; `exif_orientation` turns them upright by the
    EXIF orientation tag instead. `check_size(width, height)` runs on the size the file's header declares, before
    any pixel is decoded. Missing files, undecodable data, decompression bombs and empty images raise InputError
    naming the input."""
    name = _describe(image)
    if isinstance(image, (str, os.PathLike)) and not Path(image).is_file():
        raise InputError(f"{image} is a directory, not an image file" if Path(image).is_dir()
                         else f"image file not found: {image}")
    is_array = not isinstance(image, Image.Image) and (isinstance(image, torch.Tensor)
                                                        or hasattr(image, "__array_interface__"))
    if is_array and (str(image.dtype).removeprefix("torch.") != "uint8" or image.ndim not in (2, 3)):
        raise InputError(f"cannot use an array of {image.dtype} {list(image.shape)} as an image: give uint8 "
                         "[H, W] or [H, W, C]")
    if not is_array and not isinstance(image, (Image.Image, str, os.PathLike, bytes, bytearray)):
        raise InputError(f"cannot use {name} as an image: give a PIL image, a path, bytes or a uint8 array")
    try:
        # the size check (a warning made an error) is in open; the warning filters are global, so one thread at a
        # time there, and the decoding (load) outside
        with _WARNINGS, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(image, Image.Image):
                img = image
            elif isinstance(image, (str, os.PathLike)):
                img = Image.open(image)
            elif isinstance(image, (bytes, bytearray)):
                img = Image.open(io.BytesIO(image))
            else:
                img = Image.fromarray(image.numpy() if isinstance(image, torch.Tensor) else image)
        if check_size is not None:
            check_size(*img.size)
            if exif_orientation:  # a turn by 90 degrees swaps the sides
                check_size(img.height, img.width)
        img.load()
        if exif_orientation:
            img = ImageOps.exif_transpose(img)
    except InputError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise InputError(f"image {name} is too large to decode safely (decompression bomb check): {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError) as e:
        raise InputError(f"cannot decode image {name}: {e}") from None
    if img.width == 0 or img.height == 0:
        raise InputError(f"image {name} is empty ({img.width}x{img.height})")
    return img


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float grayscale scaled to 8 bits (a deviation: the official `convert("RGB")` clips them to
    white); other modes unchanged, so resizing and padding happen in the image's own mode as officially."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        return img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    if img.mode == "F":
        return img.point(lambda v: v * 255).convert("L")
    return img


@dataclass
class KimiVLImageProcessor:
    """Native-resolution preprocessing (spec 6): downsize only when the patch count exceeds `in_token_limit`, pad
    right/bottom to multiples of patch*merge, normalise, cut into patches."""

    patch_size: int = 14
    in_token_limit: int = 4096
    pad_input: bool = True
    merge_kernel_size: tuple[int, int] = (2, 2)
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # class defaults (OpenAI CLIP);
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)  # checkpoints override them
    max_patches_per_side: int = 512  # the official processor rejects grids the 2D RoPE table cannot cover
    exif_orientation: bool = False  # not in the published processor, which ignores the tag (see load_image)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "KimiVLImageProcessor":
        """Settings from a checkpoint's `preprocessor_config.json`; the class defaults (spec 6) where absent."""
        file = Path(path) / "preprocessor_config.json"
        if not file.is_file():
            return cls()
        try:
            cfg = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise CheckpointError(f"{file} is not valid JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{file} must hold a JSON object, got {type(cfg).__name__}")
        fields = {k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg}
        for k in ("merge_kernel_size", "image_mean", "image_std"):
            if k in fields and isinstance(fields[k], list):
                fields[k] = tuple(fields[k])
        try:
            return cls(**fields)
        except InputError as e:
            raise CheckpointError(f"{file}: {e}") from None

    def __post_init__(self) -> None:
        """Refuse settings no image can be processed with (a zero patch size, a mean of one value, ...)."""
        def whole(name: str, value, low: int = 1, high: int = 1 << 20) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise InputError(f"{name} must be an integer in {low}..{high}, got {value!r}")

        for name in ("patch_size", "in_token_limit", "max_patches_per_side"):
            whole(name, getattr(self, name))
        if not isinstance(self.merge_kernel_size, tuple) or len(self.merge_kernel_size) != 2:
            raise InputError(f"merge_kernel_size must be two integers, got {self.merge_kernel_size!r}")
        for k in self.merge_kernel_size:
            whole("merge_kernel_size", k, high=64)
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or len(value) != 3 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
                raise InputError(f"{name} must be three numbers (red, green, blue), got {value!r}")
        if not all(v > 0 for v in self.image_std):
            raise InputError(f"image_std must be positive, got {self.image_std!r}")
        for name in ("pad_input", "exif_orientation"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be true or false, got {getattr(self, name)!r}")

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """Size after the downscale rule: scale by sqrt(limit / patches) when floor(W/p)*floor(H/p) > limit."""
        p = self.patch_size
        patches = (width // p) * (height // p)
        if patches <= self.in_token_limit:
            return width, height
        s = math.sqrt(self.in_token_limit / patches)
        return max(1, int(width * s)), max(1, int(height * s))

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """The patch grid (h, w) an image of this size becomes: downscaled by the token limit, then padded to whole
        merge units (or cropped to whole patches without pad_input)."""
        w, h = self.target_size(width, height)
        p, (kh, kw) = self.patch_size, self.merge_kernel_size
        if self.pad_input:
            return -(-h // (p * kh)) * kh, -(-w // (p * kw)) * kw
        return h // p, w // p

    def check_size(self, width: int, height: int, image: Any = None) -> None:
        """Refuse, before decoding, an image whose patch grid would exceed max_patches_per_side: the token limit
        downsizes by total patch count only, so a 1 x 80,000,000 image would be padded to 2 billion pixels."""
        gh, gw = self.grid(width, height)
        if gh >= self.max_patches_per_side or gw >= self.max_patches_per_side:
            raise InputError(f"image {_describe(image)} ({width}x{height} pixels) would become a {gh}x{gw} patch "
                             f"grid; at most {self.max_patches_per_side - 1} patches per side are supported (crop or "
                             "resize it)")

    def preprocess_one(self, image: Any) -> tuple[torch.Tensor, tuple[int, int]]:
        """-> patches [h*w, 3, p, p] float32 and the grid (h, w)."""
        img = to_8bit(load_image(image, self.exif_orientation, lambda w, h: self.check_size(w, h, image)))
        size = self.target_size(img.width, img.height)
        if size != img.size:
            img = img.resize(size, Image.Resampling.BICUBIC)  # in the source mode (PIL: P and 1 use nearest)
        p = self.patch_size
        if self.pad_input:  # crop past the edge = pad right and bottom with value 0 in the source mode
            unit = p * self.merge_kernel_size[0], p * self.merge_kernel_size[1]
            w, h = -(-img.width // unit[1]) * unit[1], -(-img.height // unit[0]) * unit[0]
            img = img.crop((0, 0, w, h))
        else:  # centre crop to whole patches
            w, h = img.width // p * p, img.height // p * p
            if not w or not h:
                raise InputError(f"image {_describe(image)} ({img.width}x{img.height}) is smaller than one "
                                 f"{p}x{p} patch")
            left, top = (img.width - w) // 2, (img.height - h) // 2
            img = img.crop((left, top, left + w, top + h))
        img = img.convert("RGB")
        gh, gw = h // p, w // p
        if gh >= self.max_patches_per_side or gw >= self.max_patches_per_side:
            raise InputError(f"image {_describe(image)} gives a {gh}x{gw} patch grid; at most "
                             f"{self.max_patches_per_side - 1} patches per side are supported")
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, 3)
        x = x.permute(2, 0, 1).float().div_(255)  # [3, H, W] in [0, 1]
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        x = (x - mean) / std
        patches = x.view(3, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(gh * gw, 3, p, p)
        return patches, (gh, gw)

    def __call__(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        """-> {"pixel_values": [sum of h*w, 3, p, p] float32, "image_grid_hws": [N, 2] int64}, images in order."""
        out = [self.preprocess_one(image) for image in images]
        p = self.patch_size
        return {"pixel_values": torch.cat([x for x, _ in out]) if out else torch.zeros(0, 3, p, p),
                "image_grid_hws": torch.tensor([g for _, g in out], dtype=torch.long).view(-1, 2)}

    def num_tokens(self, grid_hw: tuple[int, int]) -> int:
        """Decoder tokens one image takes after the patch merge."""
        kh, kw = self.merge_kernel_size
        return grid_hw[0] * grid_hw[1] // (kh * kw)


class ModelInputs(dict):
    """The processor's output: a dict of tensors (input_ids, attention_mask, pixel_values, image_grid_hws) that can
    be moved as one and unpacked into `model(**inputs)` / `model.generate(**inputs)`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "ModelInputs":
        """Move every tensor to `device`; `dtype` applies to pixel_values only."""
        moved = ModelInputs({k: v.to(device) for k, v in self.items()})
        if dtype is not None and "pixel_values" in moved:
            moved["pixel_values"] = moved["pixel_values"].to(dtype)
        return moved


class KimiVLProcessor:
    """Conversations (or prompt text with `<|media_pad|>` placeholders) and images -> model inputs. Each image's
    placeholder becomes (h*w)/4 `<|media_pad|>` ids; a batch is left-padded so generation continues every row at
    the same column."""

    def __init__(self, tokenizer: KimiTokenizer, image_processor: KimiVLImageProcessor | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor or KimiVLImageProcessor()
        missing = [t for t in (MEDIA_PAD, "<|im_end|>", tokenizer.pad_token) if t not in tokenizer.special_tokens]
        if missing:
            raise CheckpointError(f"the tokenizer names no {', '.join(missing)} token: its tokenizer_config.json is "
                                  "missing or has no added_tokens_decoder with the Kimi special tokens")
        self.media_pad_id = tokenizer.token_id(MEDIA_PAD)
        self.specials_in_text = False  # True: special-token strings typed in messages become control tokens

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "KimiVLProcessor":
        if not Path(path).is_dir():
            raise CheckpointError(f"{path} is not a directory")
        try:
            return cls(KimiTokenizer.from_pretrained(path), KimiVLImageProcessor.from_pretrained(path))
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}" if str(path) not in str(e) else str(e)) from None

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the tokenizer files and `preprocessor_config.json` into a checkpoint directory."""
        self.tokenizer.save_pretrained(path)
        settings = {"image_processor_type": "KimiVLImageProcessor", "processor_class": "KimiVLProcessor",
                    **dataclasses.asdict(self.image_processor)}
        write_text_atomic(Path(path) / "preprocessor_config.json", json.dumps(settings, indent=2) + "\n")

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            specials_in_text: bool | None = None) -> str:
        """The conversation as prompt text (see KimiTokenizer.apply_chat_template); `specials_in_text` None: the
        processor's setting (False unless set: typed special-token strings stay text)."""
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt, self.specials_in_text if specials_in_text is None else specials_in_text)

    def __call__(self, messages: Sequence[dict] | Sequence[Sequence[dict]] | None = None, *,
                 text: str | Sequence[str] | None = None, images: Sequence[Any] | Sequence[Sequence[Any]] | None = None,
                 add_generation_prompt: bool = True) -> ModelInputs:
        """One conversation or a batch of them (a list of message lists), or `text` (a prompt or a list of prompts,
        each `<|media_pad|>` standing for one image). Images come from the messages' image items, or from
        `images` (one list per conversation in a batch), matched to the image slots in order."""
        if (messages is None) == (text is None):
            raise InputError("give either messages or text")
        if messages is not None:
            batch = [messages] if messages and isinstance(messages[0], dict) else list(messages)
            if not batch:
                raise InputError("no conversations given")
            prompts = [self.apply_chat_template(conv, add_generation_prompt) for conv in batch]  # checks them too
            inline = [[item.get("image") for m in conv if not isinstance(m["content"], str)
                       for item in m["content"] if item["type"] == "image"] for conv in batch]
        else:
            prompts = [text] if isinstance(text, str) else list(text)
            if not prompts:
                raise InputError("no prompts given")
            inline = [[None] * p.count(MEDIA_PAD) for p in prompts]
        if images is None:
            per_prompt = inline
        elif len(prompts) == 1 and (not images or not isinstance(images[0], (list, tuple))):
            per_prompt = [list(images)]
        else:
            per_prompt = [list(imgs) for imgs in images]
            if len(per_prompt) != len(prompts):
                raise InputError(f"got image lists for {len(per_prompt)} conversations but {len(prompts)} "
                                 "conversations")
        return self._encode(prompts, per_prompt)

    def _encode(self, prompts: list[str], images: list[list[Any]]) -> ModelInputs:
        where = [f"conversation {n}: " if len(prompts) > 1 else "" for n in range(len(prompts))]
        for n, (prompt, imgs) in enumerate(zip(prompts, images)):
            if len(imgs) != prompt.count(MEDIA_PAD):  # deliberate: a typed <|media_pad|> with no image is refused
                raise InputError(f"{where[n]}{prompt.count(MEDIA_PAD)} image slots in the prompt but {len(imgs)} "
                                 "images given")
            if None in imgs:
                raise InputError(f"{where[n]}image item {imgs.index(None)} has no image: give {{'type': 'image', "
                                 "'image': path_or_PIL}} or pass images=[...]")
        pixels = self.image_processor([img for imgs in images for img in imgs])
        grids = iter(pixels["image_grid_hws"].tolist())
        rows = []
        for n, prompt in enumerate(prompts):
            ids = self.tokenize(prompt, grids)
            if not ids:
                raise InputError(f"{where[n]}the prompt is empty")
            rows.append(ids)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_id
        out = ModelInputs(input_ids=torch.tensor([[pad] * (width - len(r)) + r for r in rows]),
                          attention_mask=torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]))
        if pixels["image_grid_hws"].numel():
            out.update(pixels)
        return out

    def tokenize(self, text: str, grids: Iterator[list[int]]) -> list[int]:
        """Token ids of `text`, each `<|media_pad|>` expanded to the merged token count of the next image grid."""
        pieces = text.split(MEDIA_PAD)
        ids = self.tokenizer.encode(pieces[0])
        for piece in pieces[1:]:
            ids += [self.media_pad_id] * self.image_processor.num_tokens(next(grids))
            ids += self.tokenizer.encode(piece)
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens)
