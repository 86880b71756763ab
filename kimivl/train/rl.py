"""Reinforcement learning: `train(model, processor, samples, reward, GRPOConfig | DAPOConfig | PPOConfig (...))`.

One step draws `prompts_per_step` samples (eval `Sample`s: images, question, answers) and samples `group_size`
responses to each in one batched generation with the latent cache, recording each token's log-probability. The
reward scores every response; the log-probabilities are recomputed under the policy in training mode (pi_old) and,
when a KL term is used, under the frozen reference (the base weights with LoRA switched off when training LoRA,
else a frozen copy of the starting model). Then `epochs` optimizer steps run over these rollouts: the first is
on-policy (ratio 1, unless dropout is on), so the clip acts from the second.

  GRPO  (DeepSeekMath) advantage (R_i - mean R) / (std R + eps) of the group, on every token of response i; clipped
        surrogate; KL to the reference with the estimator ratio - log ratio - 1 (ratio = pi_ref / pi), weight
        kl_coef; loss averaged per sequence then over sequences, or over all tokens.
  DAPO  the same with a decoupled clip (clip_eps, clip_eps_high), token-level averaging, no KL by default, dynamic
        sampling (groups whose task rewards are all equal carry no gradient: dropped and refilled with new prompts)
        and overlong shaping (a penalty falling linearly to -1 over the last `overlong_buffer` tokens of the budget).
  PPO   a value head on the decoder's final hidden states; per-token rewards (the task reward at the last token,
        minus kl_coef x the per-token KL log pi_old - log pi_ref); GAE(gamma, lam) advantages and returns; clipped
        policy loss, clipped value loss, advantage whitening; optional reward normalisation and clipping.

Log-probabilities are those of softmax(logits / temperature), the distribution the responses are drawn from (before
any top_k / top_p truncation). Runs in one process.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..errors import InputError
from ..eval.data import Sample, sample_turn
from ..generation import GenerationConfig, generate_tokens, token_logprobs
from ..model import default_position_ids
from ..processing import KimiVLProcessor
from . import parallel
from .plot import plot_curves
from .rewards import Reward, get_reward
from .run import (TrainConfig, checkpoint_due, evaluate_checkpoint, newest_checkpoint, optimizer_and_schedule, prepare,
                  prepare_out, publish, read_metrics, restore, save_checkpoint, step_indices, step_is_finite, use_bf16)

log = logging.getLogger(__name__)

LOSS_AGGREGATION = ("sequence", "token")


@dataclass
class RLConfig(TrainConfig):
    """Settings common to GRPO, DAPO and PPO (use one of those three classes; they differ in defaults and extras)."""

    algorithm: ClassVar[str] = ""
    lr: float = 1e-5
    prompts_per_step: int = 4
    group_size: int = 4  # responses sampled per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0  # sampling temperature (> 0); log-probabilities are of softmax(logits / temperature)
    top_k: int = 0
    top_p: float = 1.0
    epochs: int = 1  # optimizer steps over each step's rollouts; the first is on-policy
    micro_batch_size: int = 0  # responses per forward/backward; 0: all at once
    clip_eps: float = 0.2  # the ratio is clipped to [1 - clip_eps, 1 + clip_eps_high]
    clip_eps_high: float | None = None  # None: clip_eps (a symmetric clip)
    kl_coef: float = 0.04  # beta; 0 holds no reference
    loss_agg: str = "sequence"  # "sequence": per-response token mean, then mean over responses; "token": over tokens
    dynamic_sampling: bool = False  # drop groups whose task rewards are all equal; refill with new prompts
    max_sampling_rounds: int = 4  # generation rounds per step at most, when refilling
    overlong_buffer: int | None = 0  # > 0: the last N tokens of max_new_tokens are penalised linearly, down to -1;
    # None: max_new_tokens // 5 (DAPO's 4,096 of 20,480)
    overlong_penalty: float = 1.0  # the penalty's scale

    @property
    def overlong_tokens(self) -> int:
        return self.max_new_tokens // 5 if self.overlong_buffer is None else self.overlong_buffer

    @property
    def clip_high(self) -> float:
        return self.clip_eps if self.clip_eps_high is None else self.clip_eps_high

    def problems(self, world: int) -> list[str]:
        problems = super().problems(world)
        if world > 1:
            problems.append(f"{self.algorithm.upper()} runs in one process (got {world}); run it without torchrun")
        if self.prompts_per_step < 1 or self.group_size < 1 or self.max_new_tokens < 1 or self.epochs < 1:
            problems.append("prompts_per_step, group_size, max_new_tokens and epochs must be >= 1")
        if self.algorithm in ("grpo", "dapo") and self.group_size < 2:
            problems.append(f"group_size must be >= 2 for {self.algorithm.upper()}: advantages are relative to the "
                            "group")
        n = self.prompts_per_step * self.group_size
        if self.micro_batch_size < 0 or (self.micro_batch_size and n % self.micro_batch_size):
            problems.append(f"micro_batch_size {self.micro_batch_size} must divide the {n} responses of a step")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            problems.append(f"temperature must be > 0 (responses are sampled), got {self.temperature}")
        if not 0 < self.clip_eps < 1 or self.clip_high <= 0:
            problems.append(f"clip_eps must be in (0, 1) and clip_eps_high > 0, got {self.clip_eps}, "
                            f"{self.clip_eps_high}")
        if self.kl_coef < 0:
            problems.append(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.loss_agg not in LOSS_AGGREGATION:
            problems.append(f"loss_agg {self.loss_agg!r}: choose from {', '.join(LOSS_AGGREGATION)}")
        if self.max_sampling_rounds < 1 or not 0 <= self.overlong_tokens <= self.max_new_tokens:
            problems.append(f"max_sampling_rounds must be >= 1 and overlong_buffer in 0..{self.max_new_tokens}")
        return problems


@dataclass
class GRPOConfig(RLConfig):
    algorithm: ClassVar[str] = "grpo"


@dataclass
class DAPOConfig(RLConfig):
    algorithm: ClassVar[str] = "dapo"
    clip_eps_high: float | None = 0.28
    kl_coef: float = 0.0
    loss_agg: str = "token"
    dynamic_sampling: bool = True
    overlong_buffer: int | None = None


@dataclass
class PPOConfig(RLConfig):
    algorithm: ClassVar[str] = "ppo"
    kl_coef: float = 0.05  # in the per-token rewards, not in the loss
    loss_agg: str = "token"
    gamma: float = 1.0
    lam: float = 0.95
    value_coef: float = 0.5  # weight of the value loss
    value_clip: float = 0.2  # new values are kept within this of the rollout's values in the clipped branch
    normalize_advantages: bool = True  # whiten advantages over the step's response tokens
    reward_norm: bool = False  # standardise task rewards by running mean and std
    reward_clip: float = 0.0  # > 0: clip (normalised) task rewards to [-reward_clip, reward_clip]

    def problems(self, world: int) -> list[str]:
        problems = super().problems(world)
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            problems.append(f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")
        if self.value_coef < 0 or self.value_clip <= 0 or self.reward_clip < 0:
            problems.append("value_coef and reward_clip must be >= 0 and value_clip > 0")
        return problems


ALGORITHMS = {c.algorithm: c for c in (GRPOConfig, DAPOConfig, PPOConfig)}


@dataclass
class RLResult:
    rewards: list[float]  # per step of this call, the mean task reward of its rollouts
    losses: list[float]  # per step, the policy (+ value) loss; nan where every group was dropped
    step: int
    model_dir: Path  # the final model in the official format (LoRA merged)
    checkpoints: list[Path] = field(default_factory=list)


# ---- the algorithms' formulas ---------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: rewards [P, G] -> (R - mean R) / (std R + eps) within each group (std with Bessel's correction, as in
    the published implementations); a group of equal rewards gets 0."""
    return (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + eps)


def uniform_groups(rewards: torch.Tensor) -> torch.Tensor:
    """DAPO dynamic sampling: rewards [P, G] -> bool [P], True where every response got the same reward."""
    return (rewards == rewards[:, :1]).all(-1)


def overlong_shaping(lengths: torch.Tensor, max_len: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to max_len - buffer tokens, then falling linearly to -1 at max_len,
    -1 beyond."""
    if buffer <= 0:
        return torch.zeros(lengths.shape)
    over = (lengths.float() - (max_len - buffer)) / buffer
    return -over.clamp(0, 1)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, max_log_ratio: float = 20.0) -> torch.Tensor:
    """The unbiased, non-negative KL(pi || pi_ref) estimator GRPO uses, per token: r - log r - 1, r = pi_ref / pi.
    The log ratio is clamped to +-max_log_ratio, so one token the policy has all but ruled out cannot overflow."""
    log_ratio = (ref_logp - logp).clamp(-max_log_ratio, max_log_ratio)
    return log_ratio.exp() - log_ratio - 1


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, eps_low: float,
                      eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective as a per-token loss: -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) with
    r = pi / pi_old; and where the clip takes effect (the ratio is past the bound on the side its advantage pushes
    it to: those tokens get no gradient)."""
    ratio = (logp - old_logp).exp()
    loss = -torch.min(ratio * advantages, ratio.clamp(1 - eps_low, 1 + eps_high) * advantages)
    return loss, ((ratio < 1 - eps_low) & (advantages < 0)) | ((ratio > 1 + eps_high) & (advantages > 0))


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor,
                eps_low: float, eps_high: float, ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The GRPO / DAPO / PPO policy loss: the clipped surrogate plus kl_coef x the KL estimate to the reference (when
    given), per token, aggregated by `weights` (see `loss_weights`); and where the ratio was clipped."""
    per_token, clipped = clipped_surrogate(logp, old_logp, advantages, eps_low, eps_high)
    if ref_logp is not None and kl_coef:
        per_token = per_token + kl_coef * kl_estimate(logp, ref_logp)
    return (per_token * weights).sum(), clipped


def loss_weights(mask: torch.Tensor, how: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-token weights [N, L] that aggregate a per-token loss by a weighted sum: "token" divides by all the batch's
    tokens, "sequence" by each response's length and then the number of responses. Any split of the batch into
    micro-batches sums to the same total."""
    mask = mask.to(dtype)
    if how == "token":
        return mask / mask.sum().clamp(min=1)
    return mask / (mask.sum(-1, keepdim=True).clamp(min=1) * mask.shape[0])


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over responses [N, L] (mask: a prefix of real tokens per row; the value after
    the last token is 0): delta_t = r_t + gamma V_{t+1} - V_t, A_t = sum_l (gamma lam)^l delta_{t+l}. Returns
    (advantages, returns = A + V), zero off the mask."""
    mask = mask.to(rewards.dtype)
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def ppo_token_rewards(rewards: torch.Tensor, mask: torch.Tensor, logp: torch.Tensor | None = None,
                      ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0) -> torch.Tensor:
    """PPO's per-token rewards [N, L]: -kl_coef (log pi - log pi_ref) at every response token (when a reference is
    given), plus the sequence's reward [N] at its last token; zero off the mask (a prefix per row)."""
    token_rewards = torch.zeros(mask.shape, dtype=rewards.dtype)
    if ref_logp is not None and kl_coef:
        token_rewards = -kl_coef * (logp - ref_logp) * mask
    last = mask.sum(-1) - 1
    token_rewards[torch.arange(len(rewards)), last] += rewards
    return token_rewards


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss per token: 0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2); and where the
    clipped branch is the larger."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    plain, held = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * torch.max(plain, held), held > plain


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (population std); zero off the mask."""
    m = mask.bool()
    mean = x[m].mean()
    std = x[m].std(unbiased=False)
    return torch.where(m, (x - mean) / (std + eps), torch.zeros_like(x))


@dataclass
class RunningMoments:
    """Running mean and variance of every reward seen (Chan et al.'s parallel update), for PPO reward scaling."""

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean

    def update(self, x: torch.Tensor) -> None:
        n, mean, m2 = x.numel(), float(x.mean()), float(((x - x.mean()) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta ** 2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 1.0


class ValueHead(nn.Module):
    """PPO's critic: one linear map of the decoder's final (normed) hidden state to a scalar value."""

    def __init__(self, hidden: int):
        super().__init__()
        self.value = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value.weight)
        nn.init.zeros_(self.value.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.value(hidden)[..., 0]


# ---- rollouts -------------------------------------------------------------------------------------------------------
@dataclass
class Prompts:
    """Encoded prompts and their images, each kept once for the `group_size` responses to it (row r answers prompt
    r // group_size): the vision tower runs once per prompt, its features shared by the group's rows."""

    samples: list[Sample]  # [P]
    group_size: int
    ids: list[torch.Tensor]  # [P] token ids, image slots expanded
    pixel_values: list[torch.Tensor | None]  # [P] patches (None: no image)
    image_grid_hws: list[torch.Tensor | None]  # [P]

    @classmethod
    def encode(cls, processor: KimiVLProcessor, samples: list[Sample], group_size: int) -> "Prompts":
        encoded = [processor([sample_turn(s)]) for s in samples]
        return cls(samples, group_size, [e["input_ids"][0] for e in encoded], [e.get("pixel_values") for e in encoded],
                   [e.get("image_grid_hws") for e in encoded])

    def features(self, model, rows: Sequence[int]) -> torch.Tensor | None:
        """The image features of `rows`, in order, from one vision pass over their distinct prompts."""
        prompts = sorted({r // self.group_size for r in rows if self.pixel_values[r // self.group_size] is not None})
        if not prompts:
            return None
        media = model.config.media_placeholder_token_id
        feats = model.image_features(torch.cat([self.pixel_values[p] for p in prompts]).to(model.device, model.dtype),
                                     torch.cat([self.image_grid_hws[p] for p in prompts]).to(model.device))
        per_prompt = dict(zip(prompts, feats.split([int((self.ids[p] == media).sum()) for p in prompts])))
        return torch.cat([per_prompt[r // self.group_size] for r in rows if r // self.group_size in per_prompt])


@dataclass
class Rollouts:
    """Responses to prompts, group-major, right-padded to L tokens. A response ends with its stop token when it
    stopped, so the choice to stop is trained too."""

    prompts: Prompts
    tokens: torch.Tensor  # [N, L] response ids (pad past the end)
    mask: torch.Tensor  # [N, L] bool: real response tokens
    logprobs: torch.Tensor  # [N, L] as sampled (cached decoding)
    texts: list[str]  # [N] decoded responses, without the stop token
    scores: torch.Tensor  # [N] the task reward
    truncated: torch.Tensor  # [N] bool: cut at max_new_tokens without a stop

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)


@torch.no_grad()
def rollout(model, processor: KimiVLProcessor, samples: list[Sample], reward: Reward, config: RLConfig, seed: int
            ) -> Rollouts:
    """Sample `group_size` responses to each sample's prompt in one batched generation and score them."""
    tok = processor.tokenizer
    G = config.group_size
    prompts = Prompts.encode(processor, samples, G)
    rows = range(len(samples) * G)
    width = max(len(ids) for ids in prompts.ids)
    input_ids = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r in rows:  # left-padded: generation continues every row at the last column
        ids = prompts.ids[r // G]
        input_ids[r, width - len(ids):], attention_mask[r, width - len(ids):] = ids, 1
    stop_ids = sorted(set(tok.stop_ids) | set(model.config.text_config.eos_token_ids))
    gen = GenerationConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                           top_k=config.top_k, top_p=config.top_p, seed=seed)
    logprobs: list[torch.Tensor] = []
    steps = generate_tokens(model, input_ids.to(model.device), attention_mask.to(model.device), config=gen,
                            stop_ids=stop_ids, pad_id=tok.pad_id, logprobs=logprobs,
                            image_features=prompts.features(model, rows))
    tokens = torch.stack(list(steps), dim=1).cpu()  # [N, n]
    is_stop = torch.isin(tokens, torch.tensor(stop_ids))
    stopped = is_stop.any(-1)
    lengths = torch.where(stopped, is_stop.int().argmax(-1) + 1, tokens.shape[1])
    mask = torch.arange(int(lengths.max()))[None] < lengths[:, None]
    tokens = torch.where(mask, tokens[:, :mask.shape[1]], tok.pad_id)
    texts = [processor.decode(tokens[r, :lengths[r] - int(stopped[r])]) for r in rows]
    scores = torch.tensor([float(reward(samples[r // G], t)) for r, t in zip(rows, texts)])
    if not bool(scores.isfinite().all()):
        r = int((~scores.isfinite()).nonzero()[0])
        raise InputError(f"the reward of a response to sample {samples[r // G].index} is {float(scores[r])}: "
                         "rewards must be finite numbers")
    return Rollouts(prompts, tokens, mask, torch.where(mask, torch.stack(logprobs, 1).float().cpu()[:, :mask.shape[1]],
                                                       0.0), texts, scores, ~stopped)


def concat_rollouts(parts: list[Rollouts], keep: list[tuple[int, int]], pad_id: int) -> Rollouts:
    """The groups `keep` ((part, prompt) pairs) of several rollouts as one, re-padded to their longest response."""
    G = parts[0].prompts.group_size
    rows = [(parts[p], q * G + g) for p, q in keep for g in range(G)]
    L = max(int(part.lengths[r]) for part, r in rows)

    def stack(name: str, value) -> torch.Tensor:
        return torch.stack([F.pad(getattr(part, name)[r], (0, L - getattr(part, name).shape[1]), value=value)
                            for part, r in rows])

    def pick(name: str) -> list:
        return [getattr(parts[p].prompts, name)[q] for p, q in keep]
    prompts = Prompts(pick("samples"), G, pick("ids"), pick("pixel_values"), pick("image_grid_hws"))
    return Rollouts(prompts, stack("tokens", pad_id), stack("mask", False), stack("logprobs", 0.0),
                    [part.texts[r] for part, r in rows], torch.stack([part.scores[r] for part, r in rows]),
                    torch.stack([part.truncated[r] for part, r in rows]))


def collect(model, processor, samples: Sequence[Sample], reward: Reward, config: RLConfig, step: int
            ) -> tuple[Rollouts, dict]:
    """The step's rollouts, and statistics over every response generated for it. With dynamic sampling, groups whose
    task rewards are all equal are dropped (the DAPO paper's filter, on accuracy rather than on shaped rewards) and
    new prompts drawn, up to max_sampling_rounds generations, until prompts_per_step groups are kept; the step
    trains on what it has then. Refill draws are uniform and may repeat a prompt of the step."""
    P, G = config.prompts_per_step, config.group_size
    parts: list[Rollouts] = []
    keep: list[tuple[int, int]] = []
    for round_ in range(config.max_sampling_rounds if config.dynamic_sampling else 1):
        if round_ == 0:
            chosen = step_indices(step, len(samples), P, config.seed)
        else:  # refills: a draw seeded by (seed, step, round), so a resumed run draws the same
            chosen = random.Random(f"{config.seed}:{step}:{round_}").sample(range(len(samples)),
                                                                             min(P, len(samples)))
        parts.append(rollout(model, processor, [samples[i] for i in chosen], reward, config,
                             seed=(config.seed * 1_000_003 + step) * 31 + round_))
        flat = uniform_groups(parts[-1].scores.view(-1, G)) if config.dynamic_sampling else [False] * len(chosen)
        keep += [(len(parts) - 1, q) for q in range(len(chosen)) if not flat[q]]
        if len(keep) >= P:
            break
    keep = keep[:P]
    scores = torch.cat([p.scores for p in parts])
    info = {"reward": float(scores.mean()), "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
            "response_len": float(torch.cat([p.lengths for p in parts]).float().mean()),
            "truncated": float(torch.cat([p.truncated for p in parts]).float().mean())}
    if config.dynamic_sampling:
        info.update(prompts_drawn=len(parts) * P, groups_kept=len(keep))
    if not keep:
        return parts[0], {**info, "empty": True}
    if len(parts) == 1 and len(keep) == len(parts[0].prompts.samples):
        return parts[0], info
    ro = concat_rollouts(parts, keep, processor.tokenizer.pad_id)
    return ro, {**info, "reward_kept": float(ro.scores.mean())}


def shaped_rewards(ro: Rollouts, config: RLConfig) -> torch.Tensor:
    """The task reward plus DAPO's overlong shaping (when overlong_buffer > 0)."""
    return ro.scores + config.overlong_penalty * overlong_shaping(ro.lengths, config.max_new_tokens,
                                                                  config.overlong_tokens)


# ---- the policy's numbers -------------------------------------------------------------------------------------------
@dataclass
class MicroBatch:
    rows: slice
    input_ids: torch.Tensor  # [n, T] prompt + response, right-padded
    attention_mask: torch.Tensor
    starts: torch.Tensor  # [n] index of each row's last prompt token (its first response token is predicted there)
    tokens: torch.Tensor  # [n, l] the response tokens, l: the longest response of these rows
    mask: torch.Tensor  # [n, l] bool

    @property
    def width(self) -> int:
        return self.tokens.shape[1]


def batches(ro: Rollouts, size: int, pad_id: int, device) -> list[MicroBatch]:
    """The rollouts' rows in micro-batches of `size`, each prompt + response right-padded."""
    out = []
    G = ro.prompts.group_size
    for b in range(0, len(ro.tokens), size):
        rows = range(b, min(b + size, len(ro.tokens)))
        seqs = [torch.cat([ro.prompts.ids[r // G], ro.tokens[r, :int(ro.lengths[r])]]) for r in rows]
        width = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, x in enumerate(seqs):
            ids[i, :len(x)], mask[i, :len(x)] = x, 1
        starts = torch.tensor([len(ro.prompts.ids[r // G]) - 1 for r in rows])
        longest = int(ro.lengths[b:b + len(seqs)].max())
        out.append(MicroBatch(slice(b, b + len(seqs)), ids.to(device), mask.to(device), starts.to(device),
                              ro.tokens[b:b + len(seqs), :longest].to(device),
                              ro.mask[b:b + len(seqs), :longest].to(device)))
    return out


def response_forward(model, ro: Rollouts, mb: MicroBatch, temperature: float, value_head: ValueHead | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities [n, l] of the response tokens (and values [n, l] of the states they are chosen in; zero
    past each response) from one forward of prompt + response. The vision tower runs once per distinct prompt; the
    vocabulary head only on real response positions."""
    lm = model.language_model
    ids, mask = mb.input_ids, mb.attention_mask
    # A sampled <|media_pad|> is a plain token (cached decoding embeds it so), not an image slot.
    sampled_media = (torch.arange(ids.shape[1], device=ids.device) > mb.starts[:, None]) & (
        ids == model.config.media_placeholder_token_id)
    embeds = model.embed(ids.masked_fill(sampled_media, 0),
                         image_features=ro.prompts.features(model, range(mb.rows.start, mb.rows.stop)))
    if bool(sampled_media.any()):
        embeds = torch.where(sampled_media[..., None], lm.model.embed_tokens(ids).to(embeds.dtype), embeds)
    hidden = lm.hidden_states(embeds, default_position_ids(ids, mask), mask)  # [n, T, H]
    positions = mb.starts[:, None] + torch.arange(mb.width, device=ids.device)  # [n, l]
    h = hidden[torch.arange(len(ids), device=ids.device)[:, None], positions.clamp(max=ids.shape[1] - 1)][mb.mask]
    logprobs = torch.zeros(mb.mask.shape, device=ids.device).masked_scatter(  # the head on real tokens only
        mb.mask, token_logprobs(lm.lm_head(h), mb.tokens[mb.mask], temperature))
    if value_head is None:
        return logprobs, None
    with torch.autocast(ids.device.type, enabled=False):  # the critic stays in float32
        values = value_head(h.float())
    return logprobs, torch.zeros(mb.mask.shape, device=ids.device).masked_scatter(mb.mask, values)


@torch.no_grad()
def score_tokens(model, ro: Rollouts, micro: list[MicroBatch], temperature: float,
                 value_head: ValueHead | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities (and values) [N, L] of every response token, without gradients; zero past the ends."""
    def full(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t.float().cpu(), (0, ro.tokens.shape[1] - t.shape[1]))
    lps, vals = [], []
    for mb in micro:
        lp, v = response_forward(model, ro, mb, temperature, value_head)
        lps.append(full(lp))
        vals.append(full(v) if v is not None else None)
    return torch.cat(lps), (torch.cat(vals) if value_head is not None else None)


@contextlib.contextmanager
def adapters_off(model):
    """LoRA adapters disabled inside: the model computes with its base weights (the reference). Which adapter
    tensors train is left as it was (peft's switch back on would make every adapter trainable)."""
    from .lora import lora_layers

    layers = list(lora_layers(model).values())
    if not layers:
        raise InputError("the reference is the model with its LoRA adapters off, but the model has none: give a "
                         "frozen copy of the starting model as the reference, or train LoRA")
    trains = {p: p.requires_grad for layer in layers for p in layer.parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in trains.items():
            p.requires_grad_(flag)


# ---- the loop -------------------------------------------------------------------------------------------------------
def train(model: nn.Module, processor: KimiVLProcessor, samples: Sequence[Sample], reward: str | Reward,
          config: RLConfig) -> RLResult:
    """Finetune `model` by `config.algorithm` on prompts from `samples` scored by `reward` (a callable
    `(sample, completion) -> float` or a built-in name, see `rewards.get_reward`); records go to `config.out`."""
    if not isinstance(config, RLConfig) or not config.algorithm:
        raise InputError("config must be a GRPOConfig, DAPOConfig or PPOConfig")
    dist = parallel.Distributed.from_env()
    config.check(dist.world)
    if len(samples) == 0:
        raise InputError("no prompts to train on")
    reward_fn, reward_name = get_reward(reward)
    if config.top_k or config.top_p < 1:
        log.warning("top_k / top_p truncate the sampling distribution, but ratios and KL use the full softmax: the "
                    "responses are then not drawn from the policy being trained")
    out = Path(config.out)
    ckpt_root = out / "checkpoints"
    resume_from = prepare_out(out, config, {"algorithm": config.algorithm, "reward": reward_name,
                                            "data_size": len(samples)})
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    is_ppo = isinstance(config, PPOConfig)
    reference = None
    if config.kl_coef > 0 and not config.lora_rank:  # a frozen copy of the starting model (LoRA: adapters off)
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    params = prepare(model, config)
    value_head = None
    if is_ppo:
        value_head = ValueHead(model.config.text_config.hidden_size).to(model.device)  # float32 whatever the model
        params = params + list(value_head.parameters())
    optimizer, scheduler = optimizer_and_schedule(params, config)
    moments = RunningMoments()
    start, elapsed = 0, 0.0
    if resume_from is not None:
        def load_extra(extra: dict) -> None:
            if value_head is not None:
                value_head.load_state_dict(extra["value_head"])
            vars(moments).update(extra.get("reward_moments", {}))
        start, elapsed, _ = restore(resume_from, model, optimizer, scheduler, config, dist, load_extra)
        log.info("resumed from %s at step %d", resume_from, start)
    bf16 = use_bf16(model, config)
    pad_id = processor.tokenizer.pad_id
    micro_size = config.micro_batch_size or config.prompts_per_step * config.group_size

    rewards_log: list[float] = []
    losses: list[float] = []
    saved: list[Path] = []
    skipped: list[int] = []  # steps whose loss or gradient norm was not finite
    metrics = open(out / "metrics.jsonl", "a", encoding="utf-8")
    bar = tqdm(total=config.steps, initial=start, desc=config.algorithm, unit="step",
               disable=None if config.progress is None else not config.progress)
    t_start = time.perf_counter() - elapsed
    try:
        for step in range(start, config.steps):
            t0 = time.perf_counter()
            model.eval()
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
                ro, info = collect(model, processor, samples, reward_fn, config, step)
            record = {"step": step + 1, **info, "rollout_seconds": time.perf_counter() - t0}
            model.train()
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
                if not info.get("empty"):
                    record.update(_optimize(model, ro, config, reference, value_head, moments, params, optimizer,
                                            micro_size, pad_id, step, skipped))
            lr = scheduler.get_last_lr()[0]
            with warnings.catch_warnings():  # a step whose groups were all dropped made no optimizer step
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step\\(\\)`")
                scheduler.step()
            record.update(lr=lr, seconds=time.perf_counter() - t_start, step_seconds=time.perf_counter() - t0)
            rewards_log.append(record["reward"])
            losses.append(record.get("loss", math.nan))  # nan: every group was dropped, no update
            bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record.get('kl', 0.0):.4f}",
                            clip=f"{record.get('clip_frac', 0.0):.3f}", len=f"{record['response_len']:.1f}")
            bar.update(1)
            done = step + 1
            if done % config.log_every == 0 or done == config.steps:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if checkpoint_due(done, skipped, config):
                extra = {"reward_moments": dataclasses.asdict(moments)}
                if value_head is not None:
                    extra["value_head"] = value_head.state_dict()
                saved.append(save_checkpoint(ckpt_root, done, model, processor, optimizer, scheduler, config, dist,
                                             time.perf_counter() - t_start, extra))
                if config.eval_data:
                    metrics.write(json.dumps({"step": done, "eval": evaluate_checkpoint(saved[-1], config)}) + "\n")
                    metrics.flush()
    finally:
        bar.close()
        metrics.close()
    model.eval()
    final = out / "model"
    publish(newest_checkpoint(ckpt_root) / "model", final)
    rows = read_metrics(out / "metrics.jsonl")
    plot_curves(out / "reward.png", {"mean reward": [(r["step"], r["reward"]) for r in rows if "reward" in r],
                                     "held-out score": [(r["step"], r["eval"]) for r in rows if "eval" in r]})
    return RLResult(rewards=rewards_log, losses=losses, step=config.steps, model_dir=final, checkpoints=saved)


def _optimize(model, ro: Rollouts, config: RLConfig, reference, value_head: ValueHead | None,
              moments: RunningMoments, params: list, optimizer, micro_size: int, pad_id: int, step: int,
              skipped: list[int]) -> dict:
    """Advantages for the rollouts, then `epochs` optimizer steps over them; -> the step's statistics."""
    micro = batches(ro, micro_size, pad_id, model.device)
    mask = ro.mask
    old_logp, old_values = score_tokens(model, ro, micro, config.temperature, value_head)  # pi_old, in training mode
    stats = {"logprob_gap": float((old_logp - ro.logprobs).abs()[mask].max())}  # cached decoding vs training mode
    ref_logp = None
    if config.kl_coef > 0:
        if reference is not None:
            ref_logp, _ = score_tokens(reference, ro, micro, config.temperature)
        else:
            with adapters_off(model):
                ref_logp, _ = score_tokens(model, ro, micro, config.temperature)
        stats["kl"] = float(kl_estimate(old_logp, ref_logp)[mask].mean())

    rewards = shaped_rewards(ro, config)
    if isinstance(config, PPOConfig):
        if config.reward_norm:
            moments.update(rewards)
            rewards = (rewards - moments.mean) / (moments.std + 1e-8)
        if config.reward_clip:
            rewards = rewards.clamp(-config.reward_clip, config.reward_clip)
        token_rewards = ppo_token_rewards(rewards, mask, old_logp, ref_logp, config.kl_coef)
        advantages, returns = gae(token_rewards, old_values, mask, config.gamma, config.lam)
        if config.normalize_advantages:
            advantages = whiten(advantages, mask)
        stats.update(value=float(old_values[mask].mean()), returns=float(returns[mask].mean()))
    else:
        advantages = group_advantages(rewards.view(-1, config.group_size)).flatten()[:, None] * mask
        returns = None
    weights = loss_weights(mask, config.loss_agg)
    value_weights = loss_weights(mask, "token")
    totals = {"loss": 0.0, "clip_frac": 0.0, "value_loss": 0.0, "value_clip_frac": 0.0, "grad_norm": 0.0}
    n_tokens = float(mask.sum())
    for _ in range(config.epochs):
        epoch_loss = 0.0
        for mb in micro:
            logp, values = response_forward(model, ro, mb, config.temperature, value_head)

            def part(t: torch.Tensor) -> torch.Tensor:  # this micro-batch's rows and width of a [N, L] tensor
                return t[mb.rows, :mb.width].to(logp.device)
            m = mb.mask
            kl_ref = part(ref_logp) if ref_logp is not None and not isinstance(config, PPOConfig) else None
            loss, clipped = policy_loss(logp, part(old_logp), part(advantages), part(weights), config.clip_eps,
                                        config.clip_high, kl_ref, config.kl_coef)
            if values is not None:
                v_loss, v_clipped = clipped_value_loss(values, part(old_values), part(returns), config.value_clip)
                v_loss = (v_loss * part(value_weights)).sum()
                loss = loss + config.value_coef * v_loss
                totals["value_loss"] += float(v_loss.detach()) / config.epochs
                totals["value_clip_frac"] += float(v_clipped[m].sum()) / n_tokens / config.epochs
            loss.backward()
            epoch_loss += float(loss.detach())
            totals["loss"] += float(loss.detach()) / config.epochs
            totals["clip_frac"] += float(clipped[m].sum()) / n_tokens / config.epochs
        grad_norm = parallel.clip_grad_norm(params, config.grad_clip)
        totals["grad_norm"] += grad_norm / config.epochs
        if step_is_finite(epoch_loss, grad_norm, step, skipped, config):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if value_head is None:
        del totals["value_loss"], totals["value_clip_frac"]
    return {**stats, **totals}
