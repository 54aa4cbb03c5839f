"""Big-model pieces on tiny models: meta-device building, lazy safetensors loading, the
layer-wise step (no whole gradient) against the ordinary step, resume, and the start-up errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from slimtrain.run.config import ConfigError, ModelConfig
from slimtrain.run.model import build_model

VOCAB, SEQ = 257, 32


def _build(**kw) -> torch.nn.Module:
    seed = kw.pop("seed", 3)
    return build_model(ModelConfig(**{"name": "llama-20m", **kw}), VOCAB, SEQ, None, 256, seed=seed)


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------- building
@pytest.mark.parametrize("dtype,int8", [("float32", False), ("bfloat16", False), ("bfloat16", True)])
def test_meta_build_equals_seeded_eager_build(dtype, int8):
    eager = _build(dtype=dtype, int8_weights=int8, init_device="cpu")
    meta = _build(dtype=dtype, int8_weights=int8, init_device="meta")
    _assert_same_tensors(eager.state_dict(), meta.state_dict())
    # non-persistent buffers (rotary frequencies) too: the two models compute the same loss
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(eager(ids, labels=ids).loss, meta(ids, labels=ids).loss)
    if int8:
        from slimtrain.optim import QuantLinear

        assert isinstance(meta.model.layers[0].mlp.up_proj, QuantLinear)
        assert meta.lm_head.weight.dtype == torch.bfloat16  # the head stays dense, as in Q-GaLore


def test_seeded_init_is_per_tensor_and_independent_of_order():
    from slimtrain.run.materialize import seeded_value

    a = seeded_value("model.layers.1.mlp.up_proj.weight", (8, 4), seed=5, std=0.02)
    seeded_value("model.layers.0.mlp.up_proj.weight", (8, 4), seed=5, std=0.02)  # another tensor drawn between
    b = seeded_value("model.layers.1.mlp.up_proj.weight", (8, 4), seed=5, std=0.02)
    c = seeded_value("model.layers.1.mlp.up_proj.weight", (8, 4), seed=6, std=0.02)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0.005 < float(a.std()) < 0.05  # N(0, 0.02)
    assert torch.equal(seeded_value("model.norm.weight", (4,), 5, 0.02), torch.ones(4))


def _save_checkpoint(tmp_path, shard: str | None = "60KB"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path, safe_serialization=True, **kw)
    return model


@pytest.mark.parametrize("sharded", [True, False])
def test_lazy_safetensors_loading_equals_full_load(tmp_path, sharded):
    from safetensors.torch import load_file

    _save_checkpoint(tmp_path, "60KB" if sharded else None)
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert (len(files) > 1) == sharded
    reference = {}
    for f in files:
        reference.update(load_file(os.path.join(tmp_path, f)))
    model = build_model(ModelConfig(name=str(tmp_path), init_device="meta"), VOCAB, SEQ, None, 256)
    loaded = {k: v for k, v in model.state_dict().items()}
    _assert_same_tensors(reference, loaded)
    # bf16 / INT8 straight from the checkpoint equal casting / quantizing the full load
    from slimtrain.optim.qgalore import quantize_rtn

    q = build_model(ModelConfig(name=str(tmp_path), init_device="meta", dtype="bfloat16", int8_weights=True),
                    VOCAB, SEQ, None, 256)
    codes, scales = quantize_rtn(reference["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16), 256)
    assert torch.equal(q.model.layers[1].mlp.down_proj.weight, codes)
    assert torch.equal(q.model.layers[1].mlp.down_proj.weight_scales, scales)
    assert torch.equal(q.lm_head.weight, reference["lm_head.weight"].to(torch.bfloat16))


def test_checkpoint_shape_mismatch_names_first_tensor(tmp_path):
    _save_checkpoint(tmp_path, None)
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    cfg["intermediate_size"] = 96  # the config no longer describes the checkpoint
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ConfigError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \(80, 32\) but "
                                          r"the model config makes it \(96, 32\)"):
        build_model(ModelConfig(name=str(tmp_path), init_device="meta"), VOCAB, SEQ, None, 256)


_RSS_SCRIPT = textwrap.dedent("""
    import gc, resource, torch
    torch.set_num_threads(1)
    from slimtrain.run.config import ModelConfig
    from slimtrain.run.model import build_model

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()

    def peak_rss():  # VmHWM: the peak since the last reset below
        line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    build_model(ModelConfig(name="llama-20m", init_device="meta", dtype="bfloat16"), 257, 32, None, 256)  # warm-up
    for device in ("meta", "cpu"):
        gc.collect()
        # reset the peak to the current RSS (Linux clear_refs "5"), so an earlier spike (imports,
        # warm-up) cannot be counted as this build's
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = rss()
        model = build_model(ModelConfig(name="llama-60m", init_device=device, dtype="bfloat16"), 257, 32, None, 256)
        peak = peak_rss()
        final = sum(p.numel() * p.element_size() for p in model.parameters())
        largest = max(p.numel() for p in model.parameters()) * 4
        print(peak - before, final, largest)
        del model
""")


def test_meta_build_peak_is_final_footprint_plus_one_tensor():
    """Peak RSS growth (read in a fresh process) while building Llama-60m shapes (byte vocabulary,
    25M parameters) in bf16: at most the final bf16 bytes + two fp32 copies of the largest tensor
    (its draw and its cast) + 16 MiB of allocator slack; the eager build exceeds that bound."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], capture_output=True, text=True, env=env, check=True,
                         cwd=root).stdout.split()
    (growth, final, largest), (eager, _, _) = [[int(x) for x in part] for part in (out[-6:-3], out[-3:])]
    bound = final + 2 * largest + 16 * 2**20
    assert growth <= bound, (growth, final, largest)
    assert eager > bound and eager > 1.5 * final, (eager, final)  # the eager build held the fp32 model


# ---------------------------------------------------------------------------- layer-wise step
STEPS = 4


def _model(dtype: str = "float32", int8: bool = False, checkpointing: bool = False) -> torch.nn.Module:
    return _build(dtype=dtype, int8_weights=int8, init_device="meta", activation_checkpointing=checkpointing,
                  seed=1)


def _optimizer(kind: str, model, layerwise: bool, accumulation: int = 1, **extra):
    from slimtrain.optim import AdamW8bit, GaLoreAdamW8bit, QGaLoreAdamW8bit, galore_param_groups, qgalore_param_groups

    common = dict(lr=3e-3, layerwise=layerwise, accumulation_steps=accumulation, **extra)
    if kind == "adamw8bit":
        return AdamW8bit([p for p in model.parameters() if p.requires_grad], min_8bit_size=256, max_grad_norm=1.0,
                         **common)
    if kind == "galore_adamw8bit":
        groups = galore_param_groups(model, rank=8, update_proj_gap=2, scale=0.25, max_grad_norm=1.0)
        return GaLoreAdamW8bit(groups, min_8bit_size=256, **common)
    groups = qgalore_param_groups(model, rank=8, update_proj_gap=2, scale=0.25)
    return QGaLoreAdamW8bit(groups, min_8bit_size=256, **common)


def _batches(n: int):
    from helpers import text_batches

    return text_batches(n, batch=2, seq=SEQ, seed=0)


def _train(model, optimizer, steps: int = STEPS, accumulation: int = 1, batches=None) -> list[float]:
    """Losses of ``steps`` optimizer steps, each over ``accumulation`` micro-batches."""
    batches = batches if batches is not None else _batches(steps * accumulation)
    losses = []
    for s in range(steps):
        total = 0.0
        for m in range(accumulation):
            ids = batches[s * accumulation + m]
            loss = model(ids, labels=ids).loss
            (loss / accumulation).backward()
            total += float(loss.detach()) / accumulation
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


CASES = [("adamw8bit", "float32", False), ("galore_adamw8bit", "float32", False), ("qgalore_adamw8bit", "float32", True),
         ("adamw8bit", "bfloat16", False), ("galore_adamw8bit", "bfloat16", False),
         ("qgalore_adamw8bit", "bfloat16", True)]


@pytest.mark.parametrize("kind,dtype,int8", CASES)
def test_layerwise_equals_ordinary_step(kind, dtype, int8):
    """The layer-wise step (with activation checkpointing) against the ordinary step without it.

    Both apply the same per-tensor update in the same order of operations (per-tensor clipping,
    the same stochastic-rounding seeds), so the curves agree to 1e-5 in fp32 and exactly for bf16
    weights / INT8 weights with stochastic rounding too: the rounding stream depends only on
    (tensor, step), not on when the update runs."""
    sr = dict(stochastic_rounding=True) if dtype == "bfloat16" else {}
    ordinary_model = _model(dtype, int8)
    ordinary = _train(ordinary_model, _optimizer(kind, ordinary_model, False, **sr))
    layer_model = _model(dtype, int8, checkpointing=True)
    layerwise = _train(layer_model, _optimizer(kind, layer_model, True, **sr))
    tol = 1e-5 if dtype == "float32" else 0.0
    assert max(abs(a - b) for a, b in zip(ordinary, layerwise)) <= tol, (ordinary, layerwise)
    assert layerwise[-1] < layerwise[0]  # it trains
    _assert_same_tensors(ordinary_model.state_dict(), layer_model.state_dict())


@pytest.mark.parametrize("kind", ["adamw8bit", "qgalore_adamw8bit"])
def test_layerwise_gradient_accumulation_equals_ordinary(kind):
    int8 = kind == "qgalore_adamw8bit"
    ordinary_model = _model(int8=int8)
    ordinary = _train(ordinary_model, _optimizer(kind, ordinary_model, False), steps=3, accumulation=2)
    layer_model = _model(int8=int8)
    layerwise = _train(layer_model, _optimizer(kind, layer_model, True, accumulation=2), steps=3, accumulation=2)
    assert max(abs(a - b) for a, b in zip(ordinary, layerwise)) <= 1e-5, (ordinary, layerwise)


def _live_gradient_counter(model):
    """Hooks (registered before the optimizer's, so they run first) that record the most
    gradients alive at once during backward, INT8 weights' ``float_grad`` included."""
    from slimtrain.optim.qgalore import GRAD_ATTR

    params = [p for p in model.parameters()]
    peak = [0]

    def count(*_):
        live = sum(1 for p in params if p.grad is not None or getattr(p, GRAD_ATTR, None) is not None)
        peak[0] = max(peak[0], live)

    for p in params:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(count)
    return params, peak


@pytest.mark.parametrize("kind,int8", [("adamw8bit", False), ("galore_adamw8bit", False), ("qgalore_adamw8bit", True)])
def test_layerwise_never_holds_the_whole_gradient(kind, int8):
    model = _model("bfloat16", int8, checkpointing=True)
    params, peak = _live_gradient_counter(model)
    optimizer = _optimizer(kind, model, True, stochastic_rounding=True)
    before = [p.detach().clone() for p in params]
    ids = _batches(1)[0]
    model(ids, labels=ids).loss.backward()
    from slimtrain.optim.qgalore import GRAD_ATTR

    # every tensor was updated inside backward and its gradient freed there
    assert all(p.grad is None and getattr(p, GRAD_ATTR, None) is None for p in params)
    assert all(not torch.equal(a, p) for a, p in zip(before, params))
    assert peak[0] == 1, peak  # only the tensor whose hook is running holds a gradient
    after = [p.detach().clone() for p in params]
    optimizer.step()  # nothing left to flush
    assert all(torch.equal(a, p) for a, p in zip(after, params))


def test_bf16_stochastic_rounding_tracks_fp32_curve():
    """bf16 weights without an fp32 master copy stay on the fp32 curve: the loss after each of 4
    AdamW8bit steps (lr 3e-3) differs from the fp32-weight run by less than 0.02 nats (bf16 keeps
    8 bits of mantissa: one rounding of the weights moves the tiny model's loss ~1e-3; stochastic
    rounding keeps the error unbiased, so it does not accumulate into a drift over a few steps)."""
    fp32_model = _model("float32")
    reference = _train(fp32_model, _optimizer("adamw8bit", fp32_model, False))
    bf16_model = _model("bfloat16")
    rounded = _train(bf16_model, _optimizer("adamw8bit", bf16_model, True, stochastic_rounding=True))
    assert max(abs(a - b) for a, b in zip(reference, rounded)) < 0.02, (reference, rounded)


def test_layerwise_resume_is_exact(tmp_path):
    """2 + 2 steps of the 7B configuration's recipe (INT8 + bf16 weights, QGaLoreAdamW8bit
    layer-wise, stochastic rounding, checkpointing) through a weights_only save equal 4 steps."""
    batches = _batches(STEPS)
    model = _model("bfloat16", True, checkpointing=True)
    whole = _train(model, _optimizer("qgalore_adamw8bit", model, True, stochastic_rounding=True), batches=batches)

    model = _model("bfloat16", True, checkpointing=True)
    optimizer = _optimizer("qgalore_adamw8bit", model, True, stochastic_rounding=True)
    first = _train(model, optimizer, steps=2, batches=batches[:2])
    torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model = _build(dtype="bfloat16", int8_weights=True, init_device="meta", activation_checkpointing=True, seed=99)
    model.load_state_dict(saved["model"])
    optimizer = _optimizer("qgalore_adamw8bit", model, True, stochastic_rounding=True)
    optimizer.load_state_dict(saved["optim"])
    second = _train(model, optimizer, steps=2, batches=batches[2:])
    assert first + second == whole


def test_big_step_7b_default_is_the_small_box_config():
    # `python bench/big_step.py --shape llama-7b` is the measured <= 10 GB row of docs/benchmarks.md
    # section 10; it must run what docs/configs/llama7b_small_box.yaml trains with (memory-wise:
    # lr and clipping do not change the footprint, so they are not compared).
    import importlib.util

    from slimtrain.run.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("big_step", os.path.join(root, "bench", "big_step.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = load_config(bench.SMALL_BOX)
    args = bench.parse_args(["--shape", "llama-7b"])
    opt = cfg.optim.args
    assert args.optim == [cfg.optim.name] == ["qgalore_adamw8bit"]
    assert (args.rank, args.int8_update_chunk, args.proj_method) == (opt["rank"], opt["int8_update_chunk"],
                                                                     opt["proj_method"])
    assert {k: opt[k] for k in bench.GALORE} == bench.GALORE
    assert opt["layerwise"] and opt["stochastic_rounding"]  # what the bench's layer-wise rows use
    assert (args.seq, args.batch, cfg.train.grad_accum) == (cfg.data.seq_len, cfg.train.batch_size, 1)
    m = cfg.model
    assert (m.name, m.dtype, m.init_device, m.int8_weights, m.activation_checkpointing) == (
        "llama-7b", "bfloat16", "meta", True, True)
    assert m.int8_group_size == ModelConfig().int8_group_size  # the bench builds with the default group
    # explicit arguments win
    assert bench.parse_args(["--shape", "llama-7b", "--rank", "128", "--int8-update-chunk", "0"]).rank == 128


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("overrides,match", [
    ({"optim.name": "adamw"}, r"optim.name='adamw': this optimizer has no layer-wise .* adamw8bit"),
    ({"optim.name": "mezo"}, r"zeroth-order optimizer computes no gradient"),
    ({"optim.name": "adamw8bit", "dist.zero_stage": 1}, r"ZeRO shards .* dist.zero_stage=0"),
    ({"optim.name": "adamw8bit", "train.max_grad_norm": 1.0}, r"global-norm clipping .* optim.args.max_grad_norm"),
])
def test_layerwise_config_refused_at_start_up(overrides, match):
    from slimtrain.run.config import load_config
    from slimtrain.run.layerwise import check_layerwise_config

    base = {"optim.args": "{layerwise: true}", "train.max_grad_norm": 0}
    cfg = load_config(None, [f"{k}={v}" for k, v in {**base, **overrides}.items()])
    with pytest.raises(ConfigError, match=match):
        check_layerwise_config(cfg)
