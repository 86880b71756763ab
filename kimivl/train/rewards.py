"""Rewards for RL finetuning: any callable `(sample, completion) -> float`.

The built-ins score the answer part of a completion (after a Thinking model's ◁think▷ ... ◁/think▷, as `kimivl
eval` does) with the eval metrics, and `format` checks the Thinking layout itself. Names combine with `+`
(`"exact+format"` sums the two); `"package.module:function"` imports a callable.
"""

from __future__ import annotations

import importlib
from typing import Callable

from ..errors import InputError
from ..eval.data import Sample
from ..eval.metrics import anls, mmbench_choice, ocr_record, relaxed_accuracy
from ..tokenizer import THINK_END, THINK_START, split_thinking

Reward = Callable[[Sample, str], float]


def answer_of(completion: str) -> str:
    """The part of a completion that is scored: the text after the thinking, stripped."""
    return split_thinking(completion)[1]


def exact_match(sample: Sample, completion: str) -> float:
    """1 if the answer equals a ground truth exactly (case-sensitive, stripped; the `ocr` metric), else 0."""
    return ocr_record(answer_of(completion), sample.answers)["score"]


def anls_reward(sample: Sample, completion: str) -> float:
    """Average normalised Levenshtein similarity with threshold 0.5 (the `anls` metric), in [0, 1]."""
    return anls(answer_of(completion), sample.answers)


def relaxed_reward(sample: Sample, completion: str) -> float:
    """Numbers within 5 %, exact match otherwise (the `relaxed` metric)."""
    return relaxed_accuracy(answer_of(completion), sample.answers)


def choice_reward(sample: Sample, completion: str) -> float:
    """1 if the option MMBench's matching reads from the answer is the right letter. Unlike the `mcq` metric there is
    no random pick when no option is found: that scores 0."""
    if not sample.options:
        raise InputError(f"sample {sample.index}: the choice reward needs options (columns A, B, ...)")
    return float(mmbench_choice(answer_of(completion), sample.options) == sample.answers[0])


def think_format(sample: Sample, completion: str) -> float:
    """1 for the Thinking layout: the completion opens with ◁think▷, has non-empty reasoning closed by one ◁/think▷,
    then a non-empty answer, and no other marker; else 0."""
    text = completion.strip()
    if not text.startswith(THINK_START):
        return 0.0
    body = text[len(THINK_START):]
    end = body.find(THINK_END)
    if end < 0:
        return 0.0
    thinking, answer = body[:end], body[end + len(THINK_END):]
    if THINK_START in thinking or THINK_START in answer or THINK_END in answer:
        return 0.0
    return float(bool(thinking.strip()) and bool(answer.strip()))


REWARDS: dict[str, Reward] = {"exact": exact_match, "anls": anls_reward, "relaxed": relaxed_reward,
                              "choice": choice_reward, "format": think_format}


def get_reward(spec: str | Reward) -> tuple[Reward, str]:
    """A reward and its name from a callable, a built-in name, names joined by `+` (summed) or
    `package.module:function`."""
    if callable(spec):
        return spec, getattr(spec, "__qualname__", type(spec).__name__)
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"a reward is a callable or a name ({', '.join(REWARDS)}), got {spec!r}")
    parts = [_one(p.strip()) for p in spec.split("+")]
    if len(parts) == 1:
        return parts[0], spec

    def total(sample: Sample, completion: str) -> float:
        return sum(r(sample, completion) for r in parts)
    return total, spec


def _one(name: str) -> Reward:
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise InputError(f"reward {name!r}: cannot import it ({e})") from None
        if not callable(fn):
            raise InputError(f"reward {name!r} is not callable")
        return fn
    raise InputError(f"unknown reward {name!r}; choose from {', '.join(REWARDS)}, join names with '+', or give "
                     "package.module:function")
