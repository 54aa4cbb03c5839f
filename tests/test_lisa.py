"""LISA: sampling, freezing, state memory vs a plain AdamW on the active set, resume, ranks,
inner GaLore / 8-bit optimizers and a real transformers.Trainer."""

from __future__ import annotations

import io
import random

import pytest
import torch

from helpers import run_ranks, text_batches, tiny_llama
from slimtrain.optim import LISA, GaLoreAdamW, find_layer_list, galore_param_groups
from slimtrain.optim.registry import build_optimizer

LAYERS = 4


def _loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


def _train(opt, model, batches, trace=None):
    for b in batches:
        _loss(model, b).backward()
        opt.step()
        opt.zero_grad()
        if trace is not None:
            trace.append(opt.active_layers)


def _state_bytes(optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def _layer_ids(model, indices):
    return {id(p) for i in indices for p in model.model.layers[i].parameters()}


def _fixed_ids(model):
    in_layers = {id(p) for p in model.model.layers.parameters()}
    return {id(p) for p in model.parameters() if id(p) not in in_layers}


def test_freezes_all_but_sampled_layers_and_switches_on_interval():
    model = tiny_llama(layers=LAYERS)
    opt = LISA(model, n_active=2, interval=3, seed=1, lr=1e-3)
    assert opt.layers_path == "model.layers"
    trace = []
    _train(opt, model, text_batches(9, batch=2, seq=16), trace)
    # trace[k] is the set after step k + 1; switches happen after steps 3, 6 and 9
    assert trace[0] == trace[1] and trace[2] == trace[3] == trace[4] and trace[5] == trace[6] == trace[7]
    assert len({tuple(trace[i]) for i in (0, 2, 5, 8)}) > 1
    active = _layer_ids(model, opt.active_layers) | _fixed_ids(model)
    for p in model.parameters():
        assert p.requires_grad == (id(p) in active)


def test_layers_are_sampled_uniformly_without_replacement():
    model = tiny_llama(layers=LAYERS)
    opt = LISA(model, n_active=2, interval=1, seed=3, lr=1e-3)
    counts = torch.zeros(LAYERS)
    n = 2000
    for _ in range(n):
        opt.step()  # no gradients: the inner AdamW skips every parameter, LISA still switches
        assert len(set(opt.active_layers)) == 2
        counts[opt.active] += 1
    # each layer is in a draw with probability n_active / L = 0.5; binomial sd = sqrt(n/4) = 22
    assert (counts - n * 0.5).abs().max() < 5 * (n * 0.25) ** 0.5


def test_state_memory_follows_active_set_and_restarts_fresh():
    model = tiny_llama(layers=LAYERS)
    opt = LISA(model, n_active=1, interval=2, seed=0, lr=1e-3)
    full = sum(2 * p.numel() * 4 for p in model.parameters())  # AdamW fp32 moments of everything
    since_active: dict[int, int] = {}
    for step, b in enumerate(text_batches(10, batch=2, seq=16)):
        before = opt.active_layers
        _loss(model, b).backward()
        opt.step()
        opt.zero_grad()
        # state exists exactly for the layers trained in this step plus the always-active modules
        expected = _layer_ids(model, before) | _fixed_ids(model)
        if opt.active_layers != before:  # a switch just dropped the old layers
            expected = _fixed_ids(model)
        held = {id(p) for p, s in opt.optimizer.state.items() if s}
        assert held == expected, step
        moments = sum(2 * p.numel() * 4 + 4 for p in model.parameters() if id(p) in expected)
        assert _state_bytes(opt.optimizer) == moments
        assert _state_bytes(opt.optimizer) < 0.55 * full
        for i in before:  # a layer's Adam step count restarts with each activation period
            since_active[i] = since_active.get(i, 0) + 1 if i in since_active else 1
        for i in set(since_active) - set(before):
            since_active.pop(i)
        for i in opt.active_layers if opt.active_layers == before else []:
            assert int(opt.optimizer.state[model.model.layers[i].mlp.up_proj.weight]["step"]) == since_active[i]
    frozen = set(range(LAYERS)) - set(opt.active_layers)
    assert all(p.grad is None for i in frozen for p in model.model.layers[i].parameters())


def test_one_period_matches_plain_adamw_on_the_same_layers():
    batches = text_batches(4, batch=2, seq=16)
    model = tiny_llama(layers=LAYERS)
    reference = tiny_llama(layers=LAYERS)
    opt = LISA(model, n_active=2, interval=4, seed=5, lr=1e-3, weight_decay=0.1)
    chosen = opt.active_layers
    for i, layer in enumerate(reference.model.layers):
        layer.requires_grad_(i in chosen)
    plain = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    _train(opt, model, batches)
    _train(plain, reference, batches)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_resume_between_switch_points_continues_with_same_layers():
    batches = text_batches(10, batch=2, seq=16)
    model = tiny_llama(layers=LAYERS)
    opt = LISA(model, n_active=2, interval=3, seed=11, lr=1e-3)
    trace = []
    _train(opt, model, batches, trace)
    reference = [p.detach().clone() for p in model.parameters()]

    model = tiny_llama(layers=LAYERS)
    opt = LISA(model, n_active=2, interval=3, seed=11, lr=1e-3)
    _train(opt, model, batches[:4])  # step 4: inside the second period
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = tiny_llama(seed=99, layers=LAYERS)
    resumed.load_state_dict(ckpt["model"])
    opt2 = LISA(resumed, n_active=2, interval=3, seed=0, lr=1e-3)  # seed and first draw come from the checkpoint
    opt2.load_state_dict(ckpt["optim"])
    assert opt2.active_layers == trace[3]
    resumed_trace = []
    _train(opt2, resumed, batches[4:], resumed_trace)
    assert resumed_trace == trace[4:]
    for p, ref in zip(resumed.parameters(), reference):
        assert torch.equal(p.detach(), ref)


def _rank_active_sets(rank, world_size):
    import torch.distributed as dist

    # different global RNG on every rank: agreement must come from LISA's own generator
    torch.manual_seed(rank)
    random.seed(rank)
    # a plain stack (no transformers import in the spawned processes, which keeps them fast)
    layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(LAYERS))
    model = torch.nn.Sequential(torch.nn.Embedding(16, 8), layers)
    opt = LISA(model, n_active=2, interval=1, seed=21, lr=1e-3)
    sets = []
    for _ in range(6):
        opt.step()
        gathered = [torch.zeros(2, dtype=torch.int64) for _ in range(world_size)]
        dist.all_gather(gathered, opt.active.clone())
        sets.append(torch.stack(gathered))
    return torch.stack(sets)  # (steps, world, n_active)


@pytest.mark.distributed
def test_all_ranks_pick_the_same_layers():
    results = run_ranks(_rank_active_sets, 2)
    for sets in results:
        assert torch.equal(sets[:, 0], sets[:, 1])  # what rank 0 and rank 1 hold, seen by this rank
    assert torch.equal(results[0], results[1])
    assert len({tuple(s.tolist()) for s in results[0][:, 0]}) > 1  # and the layers do change


def test_inner_galore_adamw_keeps_state_only_for_active_layers():
    model = tiny_llama(layers=LAYERS)
    groups = galore_param_groups(model, rank=4, update_proj_gap=2)
    opt = LISA(model, optimizer_cls=GaLoreAdamW, param_groups=groups, n_active=1, interval=3, lr=1e-3)
    batches = text_batches(5, batch=2, seq=16)
    losses = []
    for b in batches:
        loss = _loss(model, b)
        losses.append(loss.item())
        loss.backward()
        held_before = opt.active_layers
        opt.step()
        opt.zero_grad()
    held = {id(p) for p, s in opt.optimizer.state.items() if s}
    assert held <= _layer_ids(model, held_before) | _fixed_ids(model)
    q = model.model.layers[held_before[0]].self_attn.q_proj.weight
    assert opt.optimizer.state[q]["exp_avg"].shape[0] == 4 or opt.optimizer.state[q]["exp_avg"].shape[1] == 4
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt.load_state_dict(torch.load(buf, weights_only=True))
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("impl", ["slimtrain", "bitsandbytes"])
def test_inner_8bit_adamw(impl):
    if impl == "bitsandbytes":
        cls = pytest.importorskip("bitsandbytes").optim.AdamW8bit
    else:
        cls = pytest.importorskip("slimtrain.optim.adamw8bit").AdamW8bit
    model = tiny_llama(layers=LAYERS)
    opt = LISA(model, optimizer_cls=cls, n_active=1, interval=2, lr=1e-3)
    batches = text_batches(4, batch=2, seq=16)
    for b in batches:
        before = opt.active_layers
        _loss(model, b).backward()
        opt.step()
        opt.zero_grad()
    up = model.model.layers[opt.active_layers[0]].mlp.up_proj.weight
    assert up not in opt.optimizer.state or opt.active_layers == before
    held = {id(p) for p, s in opt.optimizer.state.items() if s}
    assert held <= _fixed_ids(model) | _layer_ids(model, before)
    quantized = [v for s in opt.optimizer.state.values() for v in s.values()
                 if isinstance(v, torch.Tensor) and v.dtype == torch.uint8]
    assert quantized  # the 8-bit moments are really in use for the active set
    active, saved = opt.active_layers, opt.state_dict()
    buf = io.BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    opt.load_state_dict(torch.load(buf, weights_only=True))  # tensors / plain containers only
    assert opt.active_layers == active
    assert {id(p) for p, s in opt.optimizer.state.items() if s} == held


def test_transformers_trainer_drives_lisa(tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from transformers import Trainer, TrainingArguments

    model = tiny_llama(layers=LAYERS)
    initial = [[p.detach().clone() for p in layer.parameters()] for layer in model.model.layers]
    opt = LISA(model, n_active=1, interval=3, seed=4, lr=1e-3)
    seen = [opt.active_layers[0]]
    data = [{"input_ids": b[0], "labels": b[0]} for b in text_batches(12, batch=1, seq=16)]

    from transformers import TrainerCallback

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(opt.active_layers[0])

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=9, per_device_train_batch_size=1, learning_rate=1e-3,
                             report_to=[], save_strategy="no", logging_steps=3, use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None), callbacks=[Record()])
    result = trainer.train()
    assert int(opt.state_dict()["lisa"]["step"]) == 9
    assert torch.isfinite(torch.tensor(result.training_loss))
    # the scheduler Trainer built drives the inner optimizer's lr (shared param groups)
    assert opt.optimizer.param_groups[0]["lr"] == trainer.lr_scheduler.get_last_lr()[0]
    trained = set(seen[:9])  # layers active during steps 1..9
    for i, layer in enumerate(model.model.layers):
        same = all(torch.equal(p, q) for p, q in zip(layer.parameters(), initial[i]))
        assert same == (i not in trained), (i, trained)


def test_registry_and_errors():
    model = tiny_llama(layers=LAYERS)
    opt = build_optimizer("lisa", model, inner="galore_adamw", rank=4, n_active=1, interval=5, lr=1e-3)
    assert isinstance(opt, LISA) and isinstance(opt.optimizer, GaLoreAdamW)
    with pytest.raises(ValueError, match="unknown optimizer 'nope'"):
        build_optimizer("lisa", tiny_llama(layers=LAYERS), inner="nope")
    with pytest.raises(ValueError, match=r"n_active=5 must be an integer in \[1, 4\]"):
        LISA(tiny_llama(layers=LAYERS), n_active=5)
    with pytest.raises(ValueError, match="layers='model.blocks'"):
        LISA(tiny_llama(layers=LAYERS), layers="model.blocks")


def test_layer_list_autodetect_on_an_encoder():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    model = BertForSequenceClassification(cfg)
    name, layers = find_layer_list(model)
    assert name == "bert.encoder.layer" and len(layers) == 3
    opt = LISA(model, n_active=1, lr=1e-3)
    assert model.classifier.weight.requires_grad and model.bert.embeddings.word_embeddings.weight.requires_grad
    assert sum(layer.attention.self.query.weight.requires_grad for layer in layers) == 1
    assert opt.active_layers[0] in range(3)


def test_slimtrain_trainer_drives_lisa_and_resumes_with_same_layers(tmp_path):
    from slimtrain.trainer import Trainer, load_config
    from trainer_setup import tiny_overrides

    extra = {"optim.name": "lisa", "optim.args": "{n_active: 1, interval: 3, seed: 5}", "train.steps": 8,
             "checkpoint.every": 4, "checkpoint.keep": 3}

    def run(name, resume=None):
        cfg = load_config(None, tiny_overrides(tmp_path, str(tmp_path / name), **extra))
        trainer = Trainer(cfg, resume=resume)
        try:
            trainer.train()
        finally:
            trainer.close()
        return trainer

    full = run("full")
    assert isinstance(full.optimizer, LISA) and int(full.optimizer.state_dict()["lisa"]["step"]) == 8
    # the step-4 checkpoint sits inside the second period (steps 4-6): resuming from it must
    # continue with that period's layer and moments, then draw the same next layer
    step4 = tmp_path / "full" / "checkpoints" / "step_00000004"
    assert step4.is_dir()
    resumed = run("resumed", resume=str(step4))
    assert resumed.optimizer.active_layers == full.optimizer.active_layers
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
