"""kimivl.train: labels, collation, what trains, router choice, expert balance, LoRA, checkpoints and resume."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kimivl import InputError, KimiVLForConditionalGeneration, KimiVLProcessor
from kimivl.cli import main as cli_main
from kimivl.eval.synthetic import make_synthetic
from kimivl.train import SFTConfig, SampleConversations, collate, encode, merge_and_save, train
from kimivl.train.balance import ExpertBalance, moe_layers, update_bias
from kimivl.train.data import IGNORE, read_conversations
from kimivl.train.lora import apply_lora, merged_state_dict
from kimivl.train.run import lr_lambda, prepare, step_indices



@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    path = tiny_checkpoint("tiny")
    return path, KimiVLProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def conversations():
    return SampleConversations(make_synthetic(12, split="train"))


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8).numpy())


def load(path: str) -> KimiVLForConditionalGeneration:
    return KimiVLForConditionalGeneration.from_pretrained(path)


def run(path, processor, data, tmp, **settings) -> tuple[KimiVLForConditionalGeneration, list[float]]:
    model = load(path)
    defaults = dict(out=str(tmp), steps=3, batch_size=4, lr=1e-3, progress=False)
    result = train(model, processor, data, SFTConfig(**{**defaults, **settings}))
    return model, result.losses


# ---- labels and batches -----------------------------------------------------------------------------------------
def test_only_assistant_tokens_are_labelled(tiny):
    _, processor = tiny
    image = picture(84, 56)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Word?"}]},
                {"role": "assistant", "content": "river"},
                {"role": "user", "content": "And the colour?"},
                {"role": "assistant", "content": "deep blue"}]
    ex = encode(processor, messages)
    tok = processor.tokenizer
    assert ex.input_ids.tolist() == processor(messages, add_generation_prompt=False)["input_ids"][0].tolist()
    labelled = ex.labels != IGNORE
    assert torch.equal(ex.labels[labelled], ex.input_ids[labelled])
    # the labelled runs, decoded, are exactly the two answers, each closed by <|im_end|>
    runs, current = [], []
    for i, on in zip(ex.input_ids.tolist(), labelled.tolist()):
        if on:
            current.append(i)
        elif current:
            runs.append(tok.decode(current))
            current = []
    runs += [tok.decode(current)] if current else []
    assert runs == ["river<|im_end|>", "deep blue<|im_end|>"]
    assert ex.image_grid_hws.tolist() == [[4, 6]]


def test_conversations_that_cannot_train_are_refused(tiny):
    _, processor = tiny
    with pytest.raises(InputError, match="no assistant turn"):
        encode(processor, [{"role": "user", "content": "hi"}])
    with pytest.raises(InputError, match="starts with an assistant turn"):
        encode(processor, [{"role": "assistant", "content": "hi"}])
    with pytest.raises(InputError, match="tokens long, more than the limit of 5"):
        encode(processor, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}], max_length=5)


def test_a_padded_batch_of_mixed_images_scores_each_row_as_alone(tiny, conversations):
    path, processor = tiny
    model = load(path)
    examples = [encode(processor, conversations[i]) for i in (0, 3, 4)]  # different lengths and image sizes
    assert len({len(e.input_ids) for e in examples}) == 3
    batch = collate(examples, processor.tokenizer.pad_id)
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits
        for row, e in enumerate(examples):
            alone = model(e.input_ids[None], e.pixel_values, e.image_grid_hws).logits[0]
            n = len(e.input_ids)
            torch.testing.assert_close(logits[row, :n], alone, rtol=1e-5, atol=1e-5)
            assert (labels[row, n:] == IGNORE).all()


def test_read_conversations_resolves_image_paths(tmp_path, tiny):
    _, processor = tiny
    picture(56, 28).save(tmp_path / "a.png")
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                       {"type": "text", "text": "read it"}]},
                          {"role": "assistant", "content": "ok"}]}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = read_conversations(tmp_path / "d.jsonl")
    assert data[0][0]["content"][0]["image"] == str(tmp_path / "a.png")
    assert encode(processor, data[0]).image_grid_hws.tolist() == [[2, 4]]
    (tmp_path / "bad.jsonl").write_text('{"messages": []}\nnot json\n')
    with pytest.raises(InputError, match="bad.jsonl:2: not JSON"):
        read_conversations(tmp_path / "bad.jsonl")


def test_step_indices_cover_each_conversation_once_per_epoch():
    seen = [i for step in range(5) for i in step_indices(step, 10, 4, seed=3)]  # 20 = two epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != list(range(10))  # shuffled
    assert step_indices(2, 10, 4, seed=3) == seen[8:12]


def test_learning_rate_schedule_is_warmup_then_cosine():
    f = lr_lambda(SFTConfig(out="x", steps=11, warmup_steps=2, min_lr_ratio=0.1))
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0)
    assert f(10) == pytest.approx(0.1)
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))


# ---- the loss and what trains -------------------------------------------------------------------------------------
def first_step_gradients(monkeypatch, *args, **settings) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Run `run(*args, **settings)`; return its losses and, by parameter name, the gradients the optimizer's first
    step saw."""
    seen: dict[int, torch.Tensor] = {}
    step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        if not seen:
            seen.update({id(p): p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None})
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    model, losses = run(*args, **settings)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return losses, {n: seen[id(p)] for n, p in model.named_parameters() if id(p) in seen}


def assert_same_gradients(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Elementwise equal up to 1e-5 of each tensor's largest entry: sums taken in another order."""
    assert a.keys() == b.keys() and a
    for name, x in a.items():
        torch.testing.assert_close(x, b[name], rtol=0, atol=1e-5 * float(x.abs().max()) + 1e-12, msg=name)


def test_step_loss_is_the_mean_over_assistant_tokens_and_split_invariant(tiny, conversations, tmp_path,
                                                                          monkeypatch):
    path, processor = tiny
    model = load(path)
    examples = [encode(processor, conversations[i]) for i in step_indices(0, len(conversations), 4, seed=0)]
    batch = collate(examples, processor.tokenizer.pad_id)
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits
    by_hand = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)
    losses, grads = first_step_gradients(monkeypatch, path, processor, conversations, tmp_path / "a", steps=2)
    split_losses, split_grads = first_step_gradients(monkeypatch, path, processor, conversations, tmp_path / "b",
                                                     steps=2, micro_batch_size=1)
    assert losses[0] == pytest.approx(float(by_hand), rel=1e-6)
    assert split_losses == pytest.approx(losses, rel=1e-6)
    assert_same_gradients(grads, split_grads)


def test_gradient_checkpointing_changes_nothing_but_memory(tiny, conversations, tmp_path, monkeypatch):
    path, processor = tiny
    losses, grads = first_step_gradients(monkeypatch, path, processor, conversations, tmp_path / "a", steps=2,
                                         balance="aux")
    ckpt_losses, ckpt_grads = first_step_gradients(monkeypatch, path, processor, conversations, tmp_path / "b",
                                                   steps=2, balance="aux", gradient_checkpointing=True)
    assert ckpt_losses == pytest.approx(losses, rel=1e-6)
    assert_same_gradients(grads, ckpt_grads)


def test_frozen_parts_get_no_gradient_and_do_not_change(tiny, conversations, tmp_path):
    path, processor = tiny
    before = load(path).state_dict()
    model = load(path)
    params = prepare(model, SFTConfig(out="x", freeze=("vision", "projector")))
    assert all(not n.startswith(("vision_tower", "multi_modal_projector")) for n, p in model.named_parameters()
               if p.requires_grad)
    assert len(params) == sum(p.requires_grad for p in model.parameters())
    trained, _ = run(path, processor, conversations, tmp_path, freeze=("vision", "projector"))
    for name, p in trained.named_parameters():
        if name.startswith(("vision_tower", "multi_modal_projector")):
            assert p.grad is None and torch.equal(p, before[name]), name
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(n.startswith("language_model") for n in changed)
    assert not any(n.endswith("e_score_correction_bias") for n in changed)  # balance "none": biases stay


# ---- routing and balance ------------------------------------------------------------------------------------------
def test_training_routes_like_inference(tiny, conversations, monkeypatch):
    """The experts chosen in a training forward (grad on, train mode) are those inference chooses, and the
    correction bias takes part in the choice (the greedy choice without it differs)."""
    from kimivl import decoder
    from kimivl.kernels.routing import route_reference

    path, processor = tiny
    model = load(path)
    seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def spy(x, weight, bias, cfg):
        ids, w = route_reference(x, weight, bias, cfg)
        seen.append((torch.is_grad_enabled(), ids, route_reference(x, weight, None, cfg)[0]))
        return ids, w

    monkeypatch.setattr(decoder, "route", spy)
    batch = collate([encode(processor, conversations[0])], processor.tokenizer.pad_id)
    batch.pop("labels")
    model.train()
    model(**batch).logits.sum().backward()
    model.eval()
    with torch.no_grad():
        model(**batch)
    train_ids, infer_ids = seen[:len(seen) // 2], seen[len(seen) // 2:]
    assert [s[0] for s in train_ids] == [True] * len(train_ids) and not any(s[0] for s in infer_ids)
    for (_, a, greedy), (_, b, _) in zip(train_ids, infer_ids):
        assert torch.equal(a.sort(-1).values, b.sort(-1).values)
        assert not torch.equal(a.sort(-1).values, greedy.sort(-1).values)


def test_bias_update_moves_an_overloaded_expert_down(tiny):
    model = load(tiny[0])
    layer = min(moe_layers(model))
    bias = moe_layers(model)[layer].gate.e_score_correction_bias
    before = bias.detach().clone()
    load_ = torch.tensor([40.0, 10, 10, 20, 10, 10, 10, 50])  # mean 20: experts 0 and 7 overloaded, 3 balanced
    update_bias(model, {layer: load_}, gamma=0.01)
    delta = (bias.detach() - before).tolist()
    assert delta == pytest.approx([-0.01, 0.01, 0.01, 0, 0.01, 0.01, 0.01, -0.01], abs=1e-7)


def test_sequence_aux_loss_matches_the_formula(tiny, conversations):
    """DeepSeek-V3's sequence-wise balance loss, written out per sequence with loops over experts."""
    path, processor = tiny
    model = load(path)
    balance = ExpertBalance(model, aux_alpha=0.001)
    inputs = {}
    for i, m in moe_layers(model).items():
        m.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0].detach()))
    batch = collate([encode(processor, conversations[k]) for k in (0, 1)], processor.tokenizer.pad_id)
    batch.pop("labels")
    balance.observe(batch["attention_mask"])
    model(**batch)
    got = balance.take_aux_loss()
    cfg = model.config.text_config
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    want = torch.zeros(2, dtype=torch.float64)
    for i, m in moe_layers(model).items():
        for b in range(2):
            x = inputs[i][b][batch["attention_mask"][b].bool()].double()  # [T, H] real tokens
            s = torch.sigmoid(x @ m.gate.weight.double().T)
            top = (s + m.gate.e_score_correction_bias.double()).topk(K, dim=-1).indices
            T = x.shape[0]
            for e in range(E):
                f = E / (K * T) * float((top == e).any(-1).sum())
                p = float((s[:, e] / s.sum(-1)).mean().detach())
                want[b] += 0.001 * f * p
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    assert sum(float(t.sum()) for t in balance.step_loads().values()) == \
        len(moe_layers(model)) * K * int(batch["attention_mask"].sum())


def test_aux_loss_reaches_the_router_and_loads_are_logged(tiny, conversations, tmp_path, monkeypatch):
    path, processor = tiny
    _, plain = first_step_gradients(monkeypatch, path, processor, conversations, tmp_path / "none", steps=1)
    _, aux = first_step_gradients(monkeypatch, path, processor, conversations, tmp_path / "aux", steps=1,
                                  balance="aux", aux_loss_alpha=1.0)
    gates = [n for n in plain if n.endswith("mlp.gate.weight")]
    assert gates and all((aux[n] - plain[n]).abs().max() > 1e-3 * plain[n].abs().max() for n in gates)
    rows = [json.loads(x) for x in (tmp_path / "aux" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["aux_loss"] > 0
    assert set(rows[0]["expert_load"]) == {str(i) for i in moe_layers(load(path))}
    assert all(sum(v) == pytest.approx(1.0, abs=1e-4) for v in rows[0]["expert_load"].values())


def test_bias_balance_moves_each_bias_by_gamma_against_its_logged_load(tiny, conversations, tmp_path):
    path, processor = tiny
    base = moe_layers(load(path))
    model, _ = run(path, processor, conversations, tmp_path, steps=1, balance="bias", bias_update_speed=0.01)
    shares = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["expert_load"]
    for i, m in moe_layers(model).items():
        delta = (m.gate.e_score_correction_bias - base[i].gate.e_score_correction_bias).tolist()
        mean = 1 / len(delta)
        want = [0.0 if abs(share - mean) < 1e-4 else 0.01 * math.copysign(1, mean - share) for share in shares[str(i)]]
        assert delta == pytest.approx(want, abs=1e-6) and any(want)


# ---- LoRA -------------------------------------------------------------------------------------------------------------
def test_lora_merge_gives_the_unmerged_models_outputs(tiny, conversations, tmp_path):
    path, processor = tiny
    model = load(path)
    apply_lora(model, ("attention", "mlp", "shared_experts", "projector"), rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)  # B starts at zero; make the adapters do something
    batch = collate([encode(processor, conversations[k]) for k in (0, 2)], processor.tokenizer.pad_id)
    batch.pop("labels")
    with torch.no_grad():
        unmerged = model(**batch).logits
        plain = load(path)
        assert (plain(**batch).logits - unmerged).abs().max() > 1e-3  # the adapters matter
        plain.load_state_dict(merged_state_dict(model))
        torch.testing.assert_close(plain(**batch).logits, unmerged, rtol=1e-5, atol=1e-5)
        merge_and_save(model, processor, tmp_path / "merged")  # merges in place, then an official checkpoint
        assert set(model.state_dict()) == set(plain.state_dict())
        torch.testing.assert_close(model(**batch).logits, unmerged, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load(tmp_path / "merged")(**batch).logits, unmerged, rtol=1e-5, atol=1e-5)
        assert KimiVLProcessor.from_pretrained(tmp_path / "merged").tokenizer.vocab_size == 1280


def test_an_unmerged_lora_model_generates_as_its_merged_checkpoint(tiny, conversations):
    """Cached decoding (the absorbed MLA path) sees every adapter: greedy tokens equal the merged model's."""
    from kimivl import generate

    path, processor = tiny
    model = load(path)
    apply_lora(model, ("attention", "mlp", "shared_experts", "projector", "vision"), rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    prompts = [[m for m in conversations[k] if m["role"] == "user"] for k in (0, 1)]
    unmerged = generate(model, processor, prompts, max_new_tokens=8)
    merged = load(path)
    merged.load_state_dict(merged_state_dict(model))
    assert unmerged == generate(merged, processor, prompts, max_new_tokens=8)
    assert unmerged != generate(load(path), processor, prompts, max_new_tokens=8)  # the adapters matter


def test_lora_run_trains_adapters_only_and_saves_a_merged_official_model(tiny, conversations, tmp_path):
    path, processor = tiny
    before = load(path).state_dict()
    model, _ = run(path, processor, conversations, tmp_path, lora_rank=4, lr=1e-2)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    batch = collate([encode(processor, conversations[1])], processor.tokenizer.pad_id)
    batch.pop("labels")
    saved = load(tmp_path / "model")
    with torch.no_grad():
        torch.testing.assert_close(saved(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-5)
    changed = [n for n, t in saved.state_dict().items() if not torch.equal(t, before[n])]
    assert changed and all("self_attn" in n or "mlp" in n or "projector" in n for n in changed)


# ---- checkpoints -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [{}, {"lora_rank": 4, "balance": "bias"}], ids=["full", "lora+bias"])
def test_resume_continues_exactly(tiny, conversations, tmp_path, mode, monkeypatch):
    """A 20-step run stopped (Ctrl-C) right after its step-10 checkpoint and resumed gives the losses and weights of
    20 straight steps, bit for bit (float32, CPU)."""
    from kimivl.train import sft

    path, processor = tiny
    settings = dict(steps=20, batch_size=2, warmup_steps=3, save_every=5, **mode)
    straight, losses = run(path, processor, conversations, tmp_path / "straight", **settings)
    first: list[float] = []
    save = sft.save_checkpoint

    def save_then_stop(root, step, *args):
        saved = save(root, step, *args)
        if step == 10:
            first.extend(json.loads(x)["loss"] for x in (root.parent / "metrics.jsonl").read_text().splitlines())
            raise KeyboardInterrupt
        return saved

    monkeypatch.setattr(sft, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(path, processor, conversations, tmp_path / "split", **settings)
    monkeypatch.setattr(sft, "save_checkpoint", save)
    resumed, second = run(path, processor, conversations, tmp_path / "split", **{**settings, "resume": True})
    assert len(first) == 10 and first + second == losses
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    steps = [json.loads(x)["step"] for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))


def test_an_interrupted_save_leaves_the_last_complete_checkpoint(tiny, conversations, tmp_path, monkeypatch):
    path, processor = tiny
    real_replace = os.replace

    def interrupt(src, dst):
        if os.path.basename(dst) == "step-0000004":  # the rename that publishes the complete checkpoint
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(path, processor, conversations, tmp_path, steps=6, batch_size=2, save_every=2)
    monkeypatch.setattr(os, "replace", real_replace)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step-0000002"]  # no half-written step 4, no temporary folder
    load(tmp_path / "checkpoints" / "step-0000002" / "model")
    with pytest.raises(InputError, match="pass resume=True"):
        run(path, processor, conversations, tmp_path, steps=6, batch_size=2, save_every=2)
    _, rest = run(path, processor, conversations, tmp_path, steps=6, batch_size=2, save_every=2, resume=True)
    assert len(rest) == 4


def test_resume_refuses_other_settings(tiny, conversations, tmp_path):
    path, processor = tiny
    run(path, processor, conversations, tmp_path, steps=2, batch_size=2)
    with pytest.raises(InputError, match=r"lr \(0.001 -> 0.01\)"):
        run(path, processor, conversations, tmp_path, steps=4, batch_size=2, lr=1e-2, resume=True)


def test_cli_trains_from_a_jsonl_file_and_writes_records(tiny, tmp_path, capsys):
    path, _ = tiny
    picture(70, 42).save(tmp_path / "img.png")
    row = {"messages": [{"role": "user", "content": [{"type": "image", "image": "img.png"},
                                                     {"type": "text", "text": "What is written?"}]},
                        {"role": "assistant", "content": "apple"}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    out = tmp_path / "run"
    assert cli_main(["train", "sft", "--model", path, "--data", str(tmp_path / "d.jsonl"), "--out", str(out),
                     "--steps", "3", "--batch-size", "1", "--lr", "1e-2", "--no-progress"]) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["loss"] < rows[0]["loss"]
    assert {"lr", "tokens_per_s", "grad_norm"} <= set(rows[0])
    assert (out / "loss.png").stat().st_size > 0
    load(out / "model")
    KimiVLProcessor.from_pretrained(out / "model")
    assert cli_main(["train", "sft", "--model", str(tmp_path / "nope"), "--data", str(tmp_path / "d.jsonl"),
                     "--out", str(tmp_path / "r2")]) == 1
