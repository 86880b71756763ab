"""Conversations to train on: reading them, turning each into token ids with assistant-only labels, and batching.

A conversation is a list of chat messages (`{"role": ..., "content": str | [{"type": "image", "image": ...},
{"type": "text", "text": ...}]}`), the form `KimiVLProcessor` takes. Labels are -100 everywhere except the content of
assistant turns and the `<|im_end|>` that closes each (the model must learn to stop); the system turn, user turns,
role headers and image tokens never count.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import InputError
from ..processing import KimiVLProcessor

IGNORE = -100


@dataclass
class Example:
    """One encoded conversation: ids [T], labels [T] (IGNORE off the assistant turns), its images' patches."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor  # [patches, 3, 14, 14]
    image_grid_hws: torch.Tensor  # [images, 2]


def sample_conversation(sample) -> list[dict]:
    """An eval `Sample` as a training conversation: the user turn `kimivl eval` asks (images, then `build_prompt`)
    and its first answer as the assistant turn, so a model trained on it is asked in the same words when scored."""
    from ..eval.data import sample_turn

    return [sample_turn(sample), {"role": "assistant", "content": sample.answers[0]}]


class SampleConversations(Sequence):
    """Eval samples (e.g. `make_synthetic(..., split="train")`) seen as conversations, decoded lazily."""

    def __init__(self, samples: Sequence):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> list[dict]:
        return sample_conversation(self.samples[i])


def read_conversations(path: str | os.PathLike) -> Sequence[list[dict]]:
    """A JSONL file with one `{"messages": [...]}` per line (image items name files relative to the JSONL's folder,
    or absolute paths), or an eval file (`.tsv`, or JSONL rows with `question` / `answer`), each sample becoming
    the conversation `sample_conversation` builds."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.suffix.lower() == ".tsv":
        from ..eval.data import read_tsv
        return SampleConversations(read_tsv(path))
    conversations = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{n}: not valid UTF-8 ({e.reason} at byte {e.start} of the line)") from None
            except (json.JSONDecodeError, RecursionError) as e:
                raise InputError(f"{path}:{n}: not JSON: {e}") from None
            if not conversations and isinstance(row, dict) and "question" in row and "messages" not in row:
                from ..eval.data import read_jsonl  # an eval file: every row a sample
                return SampleConversations(read_jsonl(path))
            if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
                raise InputError(f"{path}:{n}: expected an object with a 'messages' list")
            conversations.append([_resolve_images(m, path.parent) for m in row["messages"]])
    if not conversations:
        raise InputError(f"{path}: no conversations in the file")
    return conversations


def _resolve_images(message: dict, folder: Path) -> dict:
    if not isinstance(message, dict) or isinstance(message.get("content"), str):
        return message
    content = [dict(item, image=str(folder / item["image"])) if isinstance(item, dict) and item.get("type") == "image"
               and isinstance(item.get("image"), str) and not os.path.isabs(item["image"]) else item
               for item in message.get("content") or []]
    return dict(message, content=content)


def encode(processor: KimiVLProcessor, messages: Sequence[dict], max_length: int | None = None) -> Example:
    """Token ids and labels of one conversation; labels count assistant content and its closing `<|im_end|>`.

    The chat template is rendered once per assistant turn, up to its generation prompt and up to its end, so the
    target spans come from the template itself (a checkpoint's own jinja template included) rather than from
    searching the text. Raises InputError for a conversation without an assistant turn, one that starts with an
    assistant turn, or one longer than `max_length` tokens.
    """
    render = processor.apply_chat_template
    full = render(messages, add_generation_prompt=False)  # also checks the messages
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if k == 0:
            raise InputError("the conversation starts with an assistant turn: give the user turn it answers")
        prompt = render(messages[:k], add_generation_prompt=True)
        turn = render(messages[:k + 1], add_generation_prompt=False)
        if not (full.startswith(turn) and turn.startswith(prompt)):
            raise InputError("the chat template does not render a conversation as a prefix of its continuation, so "
                             "assistant turns cannot be located")
        spans.append((len(prompt), len(turn)))
    if not spans:
        raise InputError("the conversation has no assistant turn: there is nothing to learn from")
    images = [item.get("image") for m in messages if not isinstance(m["content"], str)
              for item in m["content"] if item["type"] == "image"]
    if None in images:
        raise InputError(f"image item {images.index(None)} has no image: give {{'type': 'image', 'image': "
                         "path_or_PIL}}")
    pixels = processor.image_processor(images)
    grids = iter(pixels["image_grid_hws"].tolist())
    ids: list[int] = []
    labels: list[int] = []
    cut = 0
    for start, end in spans:
        context = processor.tokenize(full[cut:start], grids)
        target = processor.tokenize(full[start:end], grids)
        ids += context + target
        labels += [IGNORE] * len(context) + target
        cut = end
    rest = processor.tokenize(full[cut:], grids)
    ids += rest
    labels += [IGNORE] * len(rest)
    if max_length is not None and len(ids) > max_length:
        raise InputError(f"the conversation is {len(ids)} tokens long, more than the limit of {max_length}")
    return Example(torch.tensor(ids), torch.tensor(labels), pixels["pixel_values"], pixels["image_grid_hws"])


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch: input_ids / attention_mask / labels [B, T_max] (padding: pad_id, 0, IGNORE) and every
    image's patches concatenated in row order (the order their `<|media_pad|>` slots appear in)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n], labels[row, :n], mask[row, :n] = e.input_ids, e.labels, 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(e.image_grid_hws.numel() for e in examples):
        batch["pixel_values"] = torch.cat([e.pixel_values for e in examples])
        batch["image_grid_hws"] = torch.cat([e.image_grid_hws for e in examples])
    return batch
