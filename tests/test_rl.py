"""kimivl.train.rl: the GRPO / DAPO / PPO formulas against hand-computed values and written-out definitions, rollouts
against the training-mode forward, the reference, rewards, resume, the CLI, and that each algorithm raises a reward."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from kimivl import KimiVLForConditionalGeneration, KimiVLProcessor
from kimivl.cli import main as cli_main
from kimivl.errors import InputError
from kimivl.eval.data import Sample
from kimivl.eval.synthetic import make_synthetic, write_synthetic
from kimivl.train import DAPOConfig, GRPOConfig, PPOConfig, get_reward, train_rl
from kimivl.train import rl
from kimivl.train.lora import apply_lora
from kimivl.train.rewards import exact_match, think_format
from kimivl.train.run import prepare, step_indices


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    path = tiny_checkpoint("tiny")
    return path, KimiVLProcessor.from_pretrained(path)


def load(path) -> KimiVLForConditionalGeneration:
    return KimiVLForConditionalGeneration.from_pretrained(path)


def digits(sample: Sample, completion: str) -> float:
    """A reward a random tiny model can learn quickly: the share of digit characters in its answer."""
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


# ---- formulas -------------------------------------------------------------------------------------------------------
def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 3.0]])
    adv = rl.group_advantages(rewards, eps=1e-6)
    # group 1: mean 0.5, sample std sqrt(1/3); group 3: mean 0.75, sample std sqrt(6.75 / 3) = 1.5
    s = math.sqrt(1 / 3)
    expected = torch.tensor([[0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s], [0.0] * 4, [-0.5, -0.5, -0.5, 1.5]])
    torch.testing.assert_close(adv, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(adv[1], torch.zeros(4))  # equal rewards: exactly zero, no division by zero


def test_gae_equals_its_closed_form():
    gen = torch.Generator().manual_seed(0)
    N, L, gamma, lam = 3, 6, 0.9, 0.8
    rewards = torch.randn(N, L, generator=gen, dtype=torch.float64)
    values = torch.randn(N, L, generator=gen, dtype=torch.float64)
    lengths = [6, 4, 1]
    mask = torch.arange(L)[None] < torch.tensor(lengths)[:, None]
    rewards = rewards * mask
    adv, ret = rl.gae(rewards, values, mask, gamma, lam)
    for i, n in enumerate(lengths):
        V = [float(values[i, t]) if t < n else 0.0 for t in range(n + 1)]  # V after the last token is 0
        delta = [float(rewards[i, t]) + gamma * V[t + 1] - V[t] for t in range(n)]
        for t in range(L):
            want = sum((gamma * lam) ** k * delta[t + k] for k in range(n - t)) if t < n else 0.0
            assert abs(float(adv[i, t]) - want) < 1e-12
            assert abs(float(ret[i, t]) - (want + V[t] if t < n else 0.0)) < 1e-12
    # lambda = 1: advantage + value is the discounted return; lambda = 0: the one-step TD error
    adv1, ret1 = rl.gae(rewards, values, mask, gamma, 1.0)
    for i, n in enumerate(lengths):
        for t in range(n):
            discounted = sum(gamma ** k * float(rewards[i, t + k]) for k in range(n - t))
            assert abs(float(ret1[i, t]) - discounted) < 1e-12
    adv0, _ = rl.gae(rewards, values, mask, gamma, 0.0)
    nxt = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros(N, 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(adv0, (rewards + gamma * nxt - values) * mask, rtol=0, atol=1e-12)


@pytest.mark.parametrize("ratio, advantage, eps_high, zero", [
    (1.5, 1.0, 0.2, True),    # above 1 + eps with A > 0: clipped, no gradient
    (0.5, -1.0, 0.2, True),   # below 1 - eps with A < 0: clipped, no gradient
    (0.5, 1.0, 0.2, False),   # below the range with A > 0: the unclipped side, gradient flows
    (1.5, -1.0, 0.2, False),  # above the range with A < 0: the unclipped side
    (1.1, 1.0, 0.2, False),   # inside
    (1.25, 1.0, 0.2, True),   # DAPO: 1.25 is clipped by a symmetric 0.2 ...
    (1.25, 1.0, 0.28, False),  # ... but not by clip_eps_high 0.28
])
def test_clipped_surrogate_gradient(ratio, advantage, eps_high, zero):
    logp = torch.tensor([math.log(ratio)], dtype=torch.float64, requires_grad=True)
    loss, clipped = rl.clipped_surrogate(logp, torch.zeros(1, dtype=torch.float64),
                                         torch.tensor([advantage], dtype=torch.float64), 0.2, eps_high)
    loss.sum().backward()
    # d/dlogp of -ratio * A is -ratio * A where the unclipped term is the minimum
    assert float(logp.grad) == (0.0 if zero else pytest.approx(-ratio * advantage, rel=1e-12))
    assert bool(clipped) == zero  # the clip fraction counts exactly the tokens the clip silenced


def test_kl_estimator_is_nonnegative_zero_at_equality_and_unbiased():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(1000, generator=gen, dtype=torch.float64), torch.randn(1000, generator=gen, dtype=torch.float64)
    assert bool((rl.kl_estimate(a, b) >= 0).all())
    assert torch.equal(rl.kl_estimate(a, a), torch.zeros_like(a))
    assert math.isfinite(float(rl.kl_estimate(torch.tensor(-500.0), torch.tensor(0.0))))  # no overflow
    # its expectation under pi is KL(pi || pi_ref), exactly, on a discrete distribution
    logp = torch.log_softmax(torch.randn(7, generator=gen, dtype=torch.float64), 0)
    ref = torch.log_softmax(torch.randn(7, generator=gen, dtype=torch.float64), 0)
    expected = float((logp.exp() * rl.kl_estimate(logp, ref)).sum())
    assert expected == pytest.approx(float((logp.exp() * (logp - ref)).sum()), rel=1e-12)


def test_policy_loss_is_the_grpo_objective_written_out():
    """Per-sequence aggregation: 1/G sum_i 1/|o_i| sum_t [-min(r A_i, clip(r) A_i) + beta D_KL], by loops."""
    gen = torch.Generator().manual_seed(2)
    N, L, beta, eps = 4, 5, 0.04, 0.2
    lengths = [5, 3, 1, 4]
    mask = torch.arange(L)[None] < torch.tensor(lengths)[:, None]
    logp, old, ref = (torch.randn(N, L, generator=gen, dtype=torch.float64) * 0.3 - 2 for _ in range(3))
    adv = torch.randn(N, generator=gen, dtype=torch.float64)[:, None].expand(N, L)
    for how in ("sequence", "token"):
        loss, _ = rl.policy_loss(logp, old, adv, rl.loss_weights(mask, how, torch.float64), eps, eps, ref, beta)
        terms = {}
        for i in range(N):
            for t in range(lengths[i]):
                r = math.exp(logp[i, t] - old[i, t])
                a = float(adv[i, t])
                q = math.exp(ref[i, t] - logp[i, t])
                terms[i, t] = -min(r * a, min(max(r, 1 - eps), 1 + eps) * a) + beta * (q - math.log(q) - 1)
        if how == "sequence":
            want = sum(sum(terms[i, t] for t in range(lengths[i])) / lengths[i] for i in range(N)) / N
        else:
            want = sum(terms.values()) / sum(lengths)
        assert float(loss) == pytest.approx(want, rel=1e-12)


def test_value_loss_clipping_by_hand():
    old, ret = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([2.0, 2.0, 2.0])
    values = torch.tensor([1.5, 1.1, 0.5], requires_grad=True)
    loss, clipped = rl.clipped_value_loss(values, old, ret, 0.2)
    # 1.5 -> clipped to 1.2: max(0.25, 0.64) = 0.64, constant in V; 1.1 inside: 0.81 both;
    # 0.5 -> clipped to 0.8: max(2.25, 1.44) = 2.25, the plain branch
    torch.testing.assert_close(loss, torch.tensor([0.32, 0.405, 1.125]))
    loss.sum().backward()
    torch.testing.assert_close(values.grad, torch.tensor([0.0, -0.9, -1.5]))
    assert clipped.tolist() == [True, False, False]


def test_ppo_token_rewards_by_hand():
    mask = torch.tensor([[True, True, True], [True, False, False]])
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, 0.0, 0.0]])
    rewards = rl.ppo_token_rewards(torch.tensor([1.0, -2.0]), mask, logp, ref, kl_coef=0.1)
    # -0.1 * (logp - ref) at every token, the sequence reward added at its last token
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 1.0], [-2.0 + 0.1, 0.0, 0.0]]))
    torch.testing.assert_close(rl.ppo_token_rewards(torch.tensor([1.0, -2.0]), mask),
                               torch.tensor([[0.0, 0.0, 1.0], [-2.0, 0.0, 0.0]]))


def test_dynamic_sampling_and_overlong_shaping_by_hand():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.25]])
    assert rl.uniform_groups(rewards).tolist() == [True, False, True, False]
    shaped = rl.overlong_shaping(torch.tensor([5, 6, 7, 8, 10]), max_len=10, buffer=4)
    torch.testing.assert_close(shaped, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0]))
    assert torch.equal(rl.overlong_shaping(torch.tensor([10]), 10, 0), torch.zeros(1))


def test_loss_weights_and_whitening():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    torch.testing.assert_close(rl.loss_weights(mask, "token"), mask / 4)
    torch.testing.assert_close(rl.loss_weights(mask, "sequence"), torch.tensor([[1 / 6] * 3 + [0], [0.5, 0, 0, 0]]))
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0], [6.0, -5.0, 7.0, 8.0]])
    w = rl.whiten(x, mask)
    real = torch.tensor([1.0, 2.0, 3.0, 6.0])
    torch.testing.assert_close(w[mask.bool()], (real - real.mean()) / real.std(unbiased=False), rtol=1e-6, atol=1e-6)
    assert w[~mask.bool()].abs().sum() == 0
    m = rl.RunningMoments()
    data = torch.randn(3, 5, dtype=torch.float64)
    for row in data:
        m.update(row)
    assert m.mean == pytest.approx(float(data.mean()), rel=1e-12)
    assert m.std == pytest.approx(float(data.std(unbiased=False)), rel=1e-12)


# ---- rewards --------------------------------------------------------------------------------------------------------
def test_rewards():
    s = Sample(index="0", question="Word?", answers=["River"])
    assert exact_match(s, " River ") == 1.0 and exact_match(s, "river") == 0.0
    assert exact_match(s, "◁think▷it says River◁/think▷River") == 1.0  # the answer after the thinking is scored
    assert exact_match(s, "◁think▷River, cut short") == 0.0  # no answer yet
    assert think_format(s, "◁think▷look at it◁/think▷River") == 1.0
    for bad in ("River", "◁think▷◁/think▷River", "◁think▷x◁/think▷", "◁think▷x", "a◁think▷x◁/think▷b",
                "◁think▷x◁/think▷b◁/think▷"):
        assert think_format(s, bad) == 0.0, bad
    both, name = get_reward("exact+format")
    assert name == "exact+format" and both(s, "◁think▷x◁/think▷River") == 2.0
    choice, _ = get_reward("choice")
    mc = Sample(index="1", question="Q", answers=["B"], options={"A": "cat", "B": "dog"})
    assert choice(mc, "B") == 1.0 and choice(mc, "A") == 0.0 and choice(mc, "no idea") == 0.0
    assert get_reward("anls")[0](s, "Rivet") == pytest.approx(0.8)
    assert get_reward("relaxed")[0](Sample(index="2", question="Q", answers=["100"]), "103") == 1.0
    assert get_reward("tests.test_rl:digits")[0](s, "a1") == 0.5
    with pytest.raises(InputError, match="unknown reward 'exactly'"):
        get_reward("exactly")


# ---- rollouts and the policy's numbers ------------------------------------------------------------------------------
def test_rollout_logprobs_equal_the_training_forward(tiny):
    """The log-probabilities recorded while sampling with the latent cache equal those of one training-mode forward
    of prompt + response (images included, prompts of different lengths, responses that stop early or run out)."""
    path, processor = tiny
    model = load(path)
    bias = torch.zeros(model.config.text_config.vocab_size)
    bias[processor.tokenizer.token_id("<|im_end|>")] = 2.0  # some responses stop early, others run out
    model.language_model.lm_head.bias = torch.nn.Parameter(bias)
    config = GRPOConfig(out="x", group_size=3, max_new_tokens=7, temperature=0.7)
    samples = make_synthetic(3, split="train")
    ro = rl.rollout(model, processor, samples, digits, config, seed=0)
    assert ro.tokens.shape[0] == 9 and ro.logprobs.shape == ro.tokens.shape
    assert ro.truncated.any() and not ro.truncated.all() and int(ro.lengths.min()) < 7
    model.train()
    again, _ = rl.score_tokens(model, ro, rl.batches(ro, 4, processor.tokenizer.pad_id, "cpu"), config.temperature)
    torch.testing.assert_close(again[ro.mask], ro.logprobs[ro.mask], rtol=0, atol=1e-5)
    for r in (0, 4, 8):  # and those of the plain model forward on each row's own prompt + response and images
        n, p = int(ro.lengths[r]), r // 3
        ids = torch.cat([ro.prompts.ids[p], ro.tokens[r, :n]])[None]
        with torch.no_grad():
            logits = model(ids, ro.prompts.pixel_values[p], ro.prompts.image_grid_hws[p]).logits[0, len(ro.prompts.ids[p]) - 1:-1]
        plain = torch.log_softmax(logits / config.temperature, -1).gather(-1, ro.tokens[r, :n, None])[:, 0]
        torch.testing.assert_close(again[r, :n], plain, rtol=0, atol=1e-5)
    for r in range(9):  # texts are the responses without their stop token; scores are the reward of each text
        n = int(ro.lengths[r])
        ids = ro.tokens[r, :n - (0 if ro.truncated[r] else 1)]
        assert ro.texts[r] == processor.decode(ids)
        assert float(ro.scores[r]) == pytest.approx(digits(samples[r // 3], ro.texts[r]), rel=1e-6)


def test_a_sampled_media_pad_token_is_a_plain_token(tiny):
    path, processor = tiny
    model = load(path)
    media = model.config.media_placeholder_token_id
    logits = torch.zeros(model.config.text_config.vocab_size)
    logits[media] = 50.0  # the model now says <|media_pad|> first
    model.language_model.lm_head.bias = torch.nn.Parameter(logits)
    ro = rl.rollout(model, processor, make_synthetic(1, split="train"), digits,
                    GRPOConfig(out="x", group_size=2, max_new_tokens=3), seed=0)
    assert bool((ro.tokens == media).any())
    again, _ = rl.score_tokens(model, ro, rl.batches(ro, 2, processor.tokenizer.pad_id, "cpu"), 1.0)
    torch.testing.assert_close(again[ro.mask], ro.logprobs[ro.mask], rtol=0, atol=1e-5)


def test_lora_reference_is_the_base_model(tiny):
    path, processor = tiny
    base, model = load(path), load(path)
    config = GRPOConfig(out="x", group_size=2, max_new_tokens=5, lora_rank=4)
    ro = rl.rollout(base, processor, make_synthetic(2, split="train"), digits, config, seed=0)
    micro = rl.batches(ro, 4, processor.tokenizer.pad_id, "cpu")
    apply_lora(model, ("attention", "mlp", "shared_experts"), 4, 16.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    plain, _ = rl.score_tokens(base, ro, micro, 1.0)
    adapted, _ = rl.score_tokens(model, ro, micro, 1.0)
    with rl.adapters_off(model):
        reference, _ = rl.score_tokens(model, ro, micro, 1.0)
    after, _ = rl.score_tokens(model, ro, micro, 1.0)
    m = ro.mask
    torch.testing.assert_close(reference[m], plain[m], rtol=0, atol=1e-6)
    assert float((adapted - plain)[m].abs().max()) > 1e-3
    assert torch.equal(after, adapted)  # switched back on
    # which adapters train is as before (peft's switch back on would make all of them trainable)
    frozen = [p for n, p in model.named_parameters() if "lora_" in n and "q_proj" in n]
    for p in frozen:
        p.requires_grad_(False)
    with rl.adapters_off(model):
        pass
    assert not any(p.requires_grad for p in frozen)
    with pytest.raises(InputError, match="has none"):
        with rl.adapters_off(base):
            pass


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_micro_batches_give_the_same_step(tiny, algorithm):
    """The loss and the update (two epochs: the second one off-policy, clipped) do not depend on how a step's
    responses are split into micro-batches."""
    path, processor = tiny
    cls = {"grpo": GRPOConfig, "ppo": PPOConfig}[algorithm]
    config = cls(out="x", group_size=4, prompts_per_step=2, max_new_tokens=6, lr=1e-3, epochs=2)
    ro = rl.rollout(load(path), processor, make_synthetic(2, split="train"), digits, config, seed=3)
    results = []
    for micro in (8, 2):
        torch.manual_seed(0)
        model = load(path)
        reference = load(path).requires_grad_(False)
        params = prepare(model, config)
        head = rl.ValueHead(model.config.text_config.hidden_size) if algorithm == "ppo" else None
        if head is not None:
            params += list(head.parameters())
        optimizer = torch.optim.SGD(params, lr=1e-2)  # (Adam would blow float-reordering noise in near-zero
        model.train()                                 # gradients up to full-size steps)
        stats = rl._optimize(model, ro, config, reference, head, rl.RunningMoments(), params, optimizer, micro,
                             processor.tokenizer.pad_id, 0, [])
        results.append((stats, [p.detach().clone() for p in params]))
    (a, pa), (b, pb) = results
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_dynamic_sampling_drops_uniform_groups_and_refills(tiny):
    path, processor = tiny
    model = load(path)
    samples = make_synthetic(10, split="train")
    first = step_indices(0, len(samples), 3, seed=0)
    flat = {samples[i].index for i in first[:2]}  # two of the first draw always get reward 1: no signal

    def reward(sample, completion):
        return 1.0 if sample.index in flat else digits(sample, completion)
    config = DAPOConfig(out="x", prompts_per_step=3, group_size=3, max_new_tokens=5, overlong_buffer=0)
    ro, info = rl.collect(model, processor, samples, reward, config, step=0)
    assert len(ro.prompts.samples) == 3 and info["groups_kept"] == 3 and info["prompts_drawn"] > 3
    assert not {s.index for s in ro.prompts.samples} & flat
    assert not rl.uniform_groups(ro.scores.view(3, 3)).any()
    assert len(ro.prompts.ids) == 3 and ro.tokens.shape[0] == 9
    # the reward reported is that of every response generated, the dropped groups' (all 1) included
    assert info["reward"] > info["reward_kept"] == pytest.approx(float(ro.scores.mean()))
    nothing, info = rl.collect(model, processor, samples, lambda s, c: 0.0, config, step=0)
    assert info["empty"] and info["prompts_drawn"] == 3 * config.max_sampling_rounds


# ---- training -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [GRPOConfig, DAPOConfig, PPOConfig], ids=lambda c: c.algorithm)
def test_each_algorithm_raises_a_learnable_reward(tiny, tmp_path, cls, report):
    """24 steps on one prompt, 16 responses of 4 tokens, reward = share of digits in the answer: the mean reward of
    the last 8 steps is well above that of the first 8 (seeded)."""
    path, processor = tiny
    result = train_rl(load(path), processor, make_synthetic(1, split="train"), digits,
                      cls(out=str(tmp_path), steps=24, prompts_per_step=1, group_size=16, max_new_tokens=4, lr=1e-2,
                          kl_coef=0.0, min_lr_ratio=1.0, progress=False, overlong_buffer=0))
    first, last = statistics.mean(result.rewards[:8]), statistics.mean(result.rewards[-8:])
    report(f"{cls.algorithm} mean reward, steps 1-8 -> 17-24", f"{first:.3f} -> {last:.3f}")
    assert last > first + 0.15
    assert (tmp_path / "reward.png").is_file() and (tmp_path / "model" / "config.json").is_file()


def digits_or_solved(sample: Sample, completion: str) -> float:
    """Every second prompt is always right (its groups are uniform: DAPO refills them); the others score digits."""
    return 1.0 if int(sample.index) % 2 == 0 else digits(sample, completion)


@pytest.mark.parametrize("cls, mode", [(GRPOConfig, {"lora_rank": 4}), (PPOConfig, {"reward_norm": True}),
                                       (DAPOConfig, {})], ids=["grpo-lora", "ppo-full", "dapo-refills"])
def test_resume_continues_exactly(tiny, tmp_path, cls, mode, monkeypatch):
    """4 straight steps equal 2 steps, an interrupt, and a resume: same rewards, losses and weights, bit for bit."""
    path, processor = tiny
    samples = make_synthetic(6, split="train")
    settings = dict(steps=4, prompts_per_step=2, group_size=3, max_new_tokens=5, lr=1e-3, save_every=2,
                    progress=False, **mode)
    reward = digits_or_solved
    straight_model = load(path)
    straight = train_rl(straight_model, processor, samples, reward, cls(out=str(tmp_path / "a"), **settings))
    if cls is DAPOConfig:
        drawn = [r["prompts_drawn"] for r in rl.read_metrics(tmp_path / "a" / "metrics.jsonl")]
        assert max(drawn[2:]) > 2  # a resumed step refills
    save = rl.save_checkpoint

    def save_then_stop(root, step, *args):
        saved = save(root, step, *args)
        if step == 2:
            raise KeyboardInterrupt
        return saved
    monkeypatch.setattr(rl, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_rl(load(path), processor, samples, reward, cls(out=str(tmp_path / "b"), **settings))
    monkeypatch.setattr(rl, "save_checkpoint", save)
    with pytest.raises(InputError, match="pass resume=True"):
        train_rl(load(path), processor, samples, reward, cls(out=str(tmp_path / "b"), **settings))
    resumed_model = load(path)
    resumed = train_rl(resumed_model, processor, samples, reward, cls(out=str(tmp_path / "b"), resume=True,
                                                                      **settings))
    assert resumed.rewards == straight.rewards[2:] and resumed.losses == straight.losses[2:]
    for (name, a), b in zip(straight_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    with pytest.raises(InputError, match="reward"):  # another reward is another run
        train_rl(load(path), processor, samples, "exact", cls(out=str(tmp_path / "b"), resume=True, **settings))


def test_a_reward_that_is_not_a_number_is_refused(tiny):
    path, processor = tiny
    with pytest.raises(InputError, match="is nan: rewards must be finite"):
        rl.rollout(load(path), processor, make_synthetic(1, split="train"), lambda s, c: float("nan"),
                   GRPOConfig(out="x", group_size=2, max_new_tokens=2), seed=0)


def test_a_step_whose_groups_are_all_dropped_makes_no_update(tiny, tmp_path, recwarn):
    path, processor = tiny
    model = load(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_rl(model, processor, make_synthetic(4, split="train"), lambda s, c: 0.0,
                      DAPOConfig(out=str(tmp_path), steps=2, prompts_per_step=2, group_size=2, max_new_tokens=3,
                                 max_sampling_rounds=2, lr=1e-2, progress=False))
    assert result.rewards == [0.0, 0.0] and all(math.isnan(x) for x in result.losses)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["empty"] for r in rows] == [True, True] and rows[1]["lr"] < rows[0]["lr"]  # the schedule moves on
    assert not [w for w in recwarn if "lr_scheduler" in str(w.message)]


def test_config_problems_are_reported():
    with pytest.raises(InputError, match="group_size must be >= 2 for GRPO"):
        GRPOConfig(out="x", group_size=1).check(1)
    with pytest.raises(InputError, match="temperature must be > 0"):
        DAPOConfig(out="x", temperature=0).check(1)
    with pytest.raises(InputError, match="runs in one process"):
        PPOConfig(out="x").check(2)
    with pytest.raises(InputError, match="micro_batch_size 3 must divide the 16"):
        GRPOConfig(out="x", micro_batch_size=3).check(1)
    assert DAPOConfig(out="x", max_new_tokens=100).overlong_tokens == 20


def test_cli_runs_grpo_and_writes_records(tiny, tmp_path, capsys):
    path, _ = tiny
    data = write_synthetic(tmp_path / "train.tsv", n=4, split="train")
    out = tmp_path / "run"
    args = ["train", "grpo", "--model", path, "--data", str(data), "--reward", "exact+format", "--out", str(out),
            "--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4", "--no-progress"]
    assert cli_main(args) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert {"reward", "kl", "clip_frac", "response_len", "loss", "grad_norm", "logprob_gap"} <= set(rows[0])
    assert rows[0]["logprob_gap"] < 1e-5
    assert (out / "reward.png").is_file()
    KimiVLForConditionalGeneration.from_pretrained(out / "model")
    assert cli_main([*args[:7], "nonsense", *args[8:]]) == 1
    assert "unknown reward 'nonsense'" in capsys.readouterr().err
