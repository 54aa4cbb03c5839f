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

    build_model(ModelConfig(name="llama-20m", init_device="meta", dtype="bfloat16"), 257, 32, None, 256)  # warm-up
    for device in ("meta", "cpu"):  # meta first: ru_maxrss only grows, and the eager peak is the higher one
        gc.collect()
        before = rss()
        model = build_model(ModelConfig(name="llama-60m", init_device=device, dtype="bfloat16"), 257, 32, None, 256)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
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
