"""Benchmark samples and the two file layouts they come in.

TSV is the layout of the standard VLM evaluation toolkits (VLMEvalKit and friends): one row per question with
columns `index`, `image` (base64 of the encoded file, or a list of them, or the `index` of another row whose image
it shares), `question`, `answer` (a string, or a Python list literal of acceptable answers), option columns `A`,
`B`, ..., `category`, `hint`, and sometimes `image_path` (a path, or a list of paths, relative to the TSV) instead
of `image`. JSONL holds one JSON object per line with the same keys; its `image` is a path (or a list of paths)
relative to the JSONL file. Columns we do not interpret are kept in `Sample.extra` and written back.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import json
import os
import string
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import DataError

REQUIRED = ("index", "question", "answer")
KNOWN = {"index", "image", "image_path", "question", "answer", "category", "hint", *string.ascii_uppercase}
IMAGE_REF_MAX = 64  # VLMEvalKit: an `image` value this short is the index of the row holding the image
CIRCULAR_STRIDE = 1_000_000  # MMBench: the k-th circular copy of question i has index i + k * 1e6


@dataclass
class Sample:
    """One benchmark question. `images` hold encoded image files (PNG, JPEG, ...), in prompt order."""

    index: str
    question: str
    answers: list[str]
    images: list[bytes] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)  # letter -> option text, in letter order
    category: str = ""
    hint: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def pil_images(self) -> list[Image.Image]:
        """The images decoded to RGB (raises DataError naming the sample when one does not decode)."""
        from ..errors import KimiVLError
        from ..processing import KimiVLImageProcessor, load_image

        out = []
        check = KimiVLImageProcessor().check_size  # no grid the model could take: refused before decoding
        for k, data in enumerate(self.images):
            try:
                out.append(load_image(data, check_size=check).convert("RGB"))
            except KimiVLError as e:
                raise DataError(f"sample {self.index}: image {k}: {e}") from None
        return out


def build_prompt(sample: Sample) -> str:
    """The text prompt of a sample: hint, question and lettered options, in the VLMEvalKit multiple-choice layout."""
    parts = [f"Hint: {sample.hint}"] if sample.hint else []
    if sample.options:
        parts.append(f"Question: {sample.question}")
        parts.append("Options:\n" + "\n".join(f"{k}. {v}" for k, v in sample.options.items()))
        parts.append("Please select the correct answer from the options above.")
    else:
        parts.append(sample.question)
    return "\n".join(parts)


def sample_turn(sample: Sample) -> dict:
    """The user turn a sample is asked as: its images, then the `build_prompt` text."""
    content = [{"type": "image", "image": im} for im in sample.pil_images()]
    return {"role": "user", "content": content + [{"type": "text", "text": build_prompt(sample)}]}


# ---- circular evaluation (MMBench) --------------------------------------------------------------------------------
def circular_expand(samples: list[Sample]) -> list[Sample]:
    """MMBench circular evaluation: a question with N options is asked N times, its options rotated by k = 0..N-1;
    copy k gets index i + k * 1e6 (VLMEvalKit's convention) and the answer letter moves with its option."""
    out = []
    for s in samples:
        base = _int_index(s)
        if base >= CIRCULAR_STRIDE:
            raise DataError(f"sample {s.index}: circular evaluation needs integer indices below {CIRCULAR_STRIDE} "
                            f"(copies are numbered index + k * {CIRCULAR_STRIDE}); this file may already hold them")
        letters = list(s.options)
        if len(letters) < 2:
            raise DataError(f"sample {s.index}: circular evaluation needs at least 2 options, found {len(letters)}")
        answer = s.answers[0] if s.answers else ""
        if answer not in s.options:
            raise DataError(f"sample {s.index}: answer {answer!r} is not one of the options {', '.join(letters)}")
        texts, a = [s.options[k] for k in letters], letters.index(answer)
        n = len(letters)
        for k in range(n):
            options = {letters[j]: texts[(j + k) % n] for j in range(n)}
            out.append(replace(s, index=str(base + k * CIRCULAR_STRIDE), options=options,
                               answers=[letters[(a - k) % n]]))
    return out


def circular_group(index: str) -> str:
    """The question a circular copy belongs to: index mod 1e6 (non-integer indices are their own group)."""
    return str(int(index) % CIRCULAR_STRIDE) if index.lstrip("-").isdigit() else index


def _int_index(s: Sample) -> int:
    try:
        return int(s.index)
    except ValueError:
        raise DataError(f"sample {s.index!r}: circular evaluation needs integer indices") from None


# ---- reading ------------------------------------------------------------------------------------------------------
def read_dataset(path: str | os.PathLike) -> list[Sample]:
    """Read a `.tsv` or `.jsonl` benchmark file."""
    path = Path(path)
    if path.suffix == ".tsv":
        return read_tsv(path)
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    raise DataError(f"{path}: unknown data format {path.suffix!r}; expected a .tsv or .jsonl file")


def read_tsv(path: str | os.PathLike) -> list[Sample]:
    """Read a TSV in the VLM evaluation toolkits' layout (see the module docstring)."""
    path = Path(path)
    text = _read_text(path)
    # base64 images exceed csv's default 128 KiB field limit; raise it (process-wide, as csv only allows)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t")
    header = next(reader)
    missing = [c for c in REQUIRED if c not in header]
    if "image" not in header and "image_path" not in header:
        missing.append("image (or image_path)")
    if missing:
        raise DataError(f"{path}: missing column{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))} "
                        f"(found: {', '.join(header)})")
    rows = []
    for values in reader:
        if not any(values):
            continue
        where = f"{path} row {len(rows) + 1} (line {reader.line_num})"
        if len(values) != len(header):
            raise DataError(f"{where}: {len(values)} fields, the header has {len(header)}")
        rows.append((where, dict(zip(header, values))))
    if not rows:
        raise DataError(f"{path} has a header but no rows")
    by_index = {row["index"]: row.get("image", "") for _, row in rows}
    samples = []
    for where, row in rows:
        image = row.get("image", "")
        if image and len(image) <= IMAGE_REF_MAX and image in by_index and image != row["index"]:
            image = by_index[image]  # the row shares the image of row `image`
        if image:
            images = [_b64_image(v, where) for v in _maybe_list(image)]
        elif row.get("image_path"):
            images = [_file_image(path.parent / p, where) for p in _maybe_list(row["image_path"])]
        else:
            raise DataError(f"{where}: no image (both 'image' and 'image_path' are empty)")
        samples.append(_sample(row, images, where))
    return _check_unique(samples, path)


def read_jsonl(path: str | os.PathLike) -> list[Sample]:
    """Read a JSONL file: one object per line with the TSV's keys; `image` is a path relative to the file."""
    path = Path(path)
    text = _read_text(path)
    samples = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise DataError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, found {type(obj).__name__}")
        missing = [k for k in (*REQUIRED, "image") if k not in obj]
        if missing:
            raise DataError(f"{where}: missing key{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))}")
        paths = obj["image"] if isinstance(obj["image"], list) else [obj["image"]]
        images = [_file_image(path.parent / str(p), where) for p in paths]
        row = {k: _cell(v) for k, v in obj.items()}
        row["answer"] = obj["answer"] if isinstance(obj["answer"], list) else [obj["answer"]]  # JSON has real lists
        samples.append(_sample(row, images, where))
    if not samples:
        raise DataError(f"{path} holds no samples")
    return _check_unique(samples, path)


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise DataError(f"{path} is empty; expected a header row or samples with keys {', '.join(REQUIRED)}, image")
    return text


def _sample(row: dict, images: list[bytes], where: str) -> Sample:
    index = _cell(row["index"])
    if not index:
        raise DataError(f"{where}: empty 'index'")
    answers = row["answer"] if isinstance(row["answer"], list) else _maybe_list(_cell(row["answer"]))
    options = {k: _cell(row[k]) for k in string.ascii_uppercase if _cell(row.get(k)) != ""}
    extra = {k: _cell(v) for k, v in row.items() if k not in KNOWN}
    return Sample(index=index, question=_cell(row["question"]), answers=[_cell(a) for a in answers],
                  images=images, options=options, category=_cell(row.get("category")), hint=_cell(row.get("hint")),
                  extra=extra)


def _cell(v) -> str:
    """A field as text; JSON numbers become their usual spelling, null and pandas' 'nan' become empty."""
    if v is None:
        return ""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    v = str(v)
    return "" if v == "nan" else v


def _maybe_list(value: str) -> list[str]:
    """A field holding either one value or a Python list literal of values (VLMEvalKit writes answers so)."""
    if value.startswith("[") and value.endswith("]"):
        try:
            items = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return [value]
        if isinstance(items, list) and all(isinstance(x, (str, int, float)) for x in items):
            return [str(x) for x in items]
    return [value]


def _b64_image(value: str, where: str) -> bytes:
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise DataError(f"{where}: 'image' is not valid base64 ({e})") from None
    _check_image(data, where)
    return data


def _file_image(path: Path, where: str) -> bytes:
    if not path.is_file():
        raise DataError(f"{where}: image {path} is a directory, not a file" if path.is_dir() else
                        f"{where}: image file {path} does not exist")
    data = path.read_bytes()
    _check_image(data, where, f" ({path})")
    return data


def _check_image(data: bytes, where: str, what: str = "") -> None:
    """Reads the header only (decoding every image up front would be slow); Sample.pil_images decodes fully."""
    try:
        with Image.open(io.BytesIO(data)):
            pass
    except (OSError, UnidentifiedImageError):
        raise DataError(f"{where}: the image{what} is not a readable image file ({len(data)} bytes)") from None


def _check_unique(samples: list[Sample], path: Path) -> list[Sample]:
    seen: dict[str, int] = {}
    for i, s in enumerate(samples):
        if s.index in seen:
            raise DataError(f"{path}: index {s.index!r} appears twice (samples {seen[s.index] + 1} and {i + 1}); "
                            "predictions are keyed by index, so it must be unique")
        seen[s.index] = i
    return samples


# ---- writing ------------------------------------------------------------------------------------------------------
def write_tsv(samples: list[Sample], path: str | os.PathLike) -> Path:
    """Write samples as a TSV that read_tsv (and pandas' `read_csv(sep='\\t')`) reads back."""
    path = Path(path)
    letters = sorted({k for s in samples for k in s.options})
    extras = list(dict.fromkeys(k for s in samples for k in s.extra))
    header = ["index", "image", "question", "hint", *letters, "answer", "category", *extras]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        for s in samples:
            b64 = [base64.b64encode(im).decode("ascii") for im in s.images]
            image = b64[0] if len(b64) == 1 else repr(b64)
            w.writerow([s.index, image, s.question, s.hint, *(s.options.get(k, "") for k in letters),
                        _format_answers(s.answers), s.category, *(s.extra.get(k, "") for k in extras)])
    return path


def write_jsonl(samples: list[Sample], path: str | os.PathLike, image_dir: str = "images") -> Path:
    """Write samples as JSONL, each image to `image_dir/` next to the file (named by index and position)."""
    path = Path(path)
    (path.parent / image_dir).mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            names = []
            for k, data in enumerate(s.images):
                with Image.open(io.BytesIO(data)) as im:
                    ext = (im.format or "bin").lower()
                name = f"{image_dir}/{_safe_name(s.index)}_{k}.{ext}"
                (path.parent / name).write_bytes(data)
                names.append(name)
            obj = {"index": int(s.index) if s.index.isdigit() else s.index,
                   "image": names[0] if len(names) == 1 else names, "question": s.question,
                   "answer": s.answers[0] if len(s.answers) == 1 else s.answers, **s.options}
            obj.update({k: v for k, v in (("category", s.category), ("hint", s.hint)) if v})
            obj.update(s.extra)
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    return path


def _format_answers(answers: list[str]) -> str:
    if len(answers) == 1 and _maybe_list(answers[0]) == answers:
        return answers[0]
    return repr(list(answers))


def _safe_name(index: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in index)
