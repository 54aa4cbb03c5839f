"""The package's rooms keep to themselves: what an optimizer can do is declared by it (its spec)
and read by everyone else; nobody outside ``slimtrain/optim`` probes optimizer classes or reads
their state keys; imports flow one way; trainer and federated share the run pieces."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest
import torch

from slimtrain.optim import registry
from slimtrain.optim.spec import PLAIN, OptimizerSpec, spec_of

from helpers import tiny_llama

ROOT = pathlib.Path(__file__).resolve().parents[1] / "slimtrain"
OPTIM_CLASSES = {"GaLoreOptimizerBase", "GaLoreAdamW", "GaLoreAdafactor", "GaLoreAdamW8bit", "QGaLoreAdamW8bit",
                 "AdamW8bit", "LISA", "MeZO", "SparseMeZO"}
# Keys slimtrain's optimizers keep in ``optimizer.state`` (and LISA / MeZO in their state dicts).
STATE_KEYS = ("proj_left", "proj_right", "proj_refreshes", "grad_acc", "next_refresh", "sim_queue", "sim_count",
              "exp_avg", "exp_avg_sq", "state_steps", "nonfinite_skipped", "codes1", "codes2", "absmax1", "absmax2")
LAYERS = ["kernels", "optim", "parallel", "run", "trainer", "federated", "launch"]


# The rooms that drive optimizers (kernels sit below optim and define the state formats).
CONSUMERS = ("parallel", "run", "trainer", "federated", "launch", "integrations")


def _sources(outside: str):
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] != outside and rel.parts[0] in CONSUMERS:
            yield rel, path.read_text()


def test_no_isinstance_on_optimizer_classes_outside_optim():
    found = []
    for rel, text in _sources("optim"):
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass"):
                names = {n.id if isinstance(n, ast.Name) else getattr(n, "attr", "") for n in ast.walk(node.args[1])}
                if names & OPTIM_CLASSES:
                    found.append(f"{rel}:{node.lineno}")
    assert not found, f"isinstance on optimizer classes outside slimtrain/optim (read the spec instead): {found}"


def test_no_optimizer_state_keys_outside_optim():
    pattern = re.compile(r"""["'](%s)["']""" % "|".join(STATE_KEYS))
    found = [f"{rel}:{i}: {line.strip()}" for rel, text in _sources("optim")
             for i, line in enumerate(text.splitlines(), 1) if pattern.search(line)]
    assert not found, f"optimizer state keys read outside slimtrain/optim: {found}"


def test_no_capability_probing_outside_optim():
    """``getattr(optimizer, "zeroth_order")`` and friends were the old way to guess; the spec replaced them."""
    probes = re.compile(r"""getattr\([^)]*["'](zeroth_order|layerwise|shape_dependent|accumulation_steps|optimizer)["']""")
    found = [f"{rel}:{i}" for rel, text in _sources("optim") for i, line in enumerate(text.splitlines(), 1)
             if probes.search(line)]
    assert not found, found


def test_imports_flow_one_way():
    """kernels <- optim <- parallel <- run <- trainer <- federated <- launch (integrations sit beside trainer)."""
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if len(rel.parts) < 2 or rel.parts[0] not in LAYERS:
            continue
        mine = LAYERS.index(rel.parts[0])
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = node.module or ""
                if node.level == 2:  # from ..x import
                    target = target.split(".")[0]
                elif node.level == 0 and target.startswith("slimtrain."):
                    target = target.split(".")[1]
                else:
                    continue
                if target in LAYERS and LAYERS.index(target) > mine:
                    bad.append(f"{rel}:{node.lineno} imports {target}")
    assert not bad, bad


OWN = ["adamw8bit", "galore_adamw", "galore_adafactor", "galore_adamw8bit", "qgalore_adamw8bit", "mezo", "sparse_mezo",
       "lisa", "apollo_adamw", "apollo_mini", "apollo_adamw8bit", "fira_adamw", "natural_galore_adamw"]
# The optimizers that offer the layer-wise (update-in-the-gradient-hook) mode.
LAYERWISE = ["adamw8bit", "galore_adamw", "galore_adafactor", "galore_adamw8bit", "qgalore_adamw8bit",
             "natural_galore_adamw"]


@pytest.mark.parametrize("name,layerwise", [(n, False) for n in OWN] + [(n, True) for n in LAYERWISE])
def test_registry_spec_is_what_the_built_optimizer_declares(name, layerwise):
    """The registry's spec (known before building) and the instance's spec cannot drift apart."""
    kwargs = {"lr": 1e-3}
    if name in ("galore_adamw", "galore_adafactor", "galore_adamw8bit", "natural_galore_adamw"):
        kwargs.update(rank=4, update_proj_gap=5, layerwise=layerwise)
    if name == "galore_adafactor":
        kwargs.update(relative_step=False)
    elif layerwise:
        kwargs.update(layerwise=True)
    if name == "qgalore_adamw8bit":
        kwargs.update(rank=4, weight_group_size=64)
    if name in ("apollo_adamw", "apollo_adamw8bit", "fira_adamw"):
        kwargs.update(rank=4)
    declared = registry.optimizer_spec(name, **kwargs)
    built = spec_of(registry.build_optimizer(name, tiny_llama(), **kwargs))
    assert declared == built
    assert isinstance(declared, OptimizerSpec)


def test_spec_fields_say_what_the_engines_need():
    spec = registry.optimizer_spec
    # torch AdamW declares nothing; its registry entry adds that it steps on FSDP2 shards
    assert spec("adamw") == PLAIN.with_(dtensor_params=True) and spec_of(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)) == PLAIN
    assert spec("mezo").zeroth_order and spec("sparse_mezo").zeroth_order
    assert spec("galore_adamw").whole_matrices and spec("galore_adamw").lowrank_grads and spec("galore_adamw").split_step
    assert not spec("galore_adamw8bit").split_step  # its 8-bit moments have no direction/apply split
    assert spec("galore_adamw", layerwise=True).layerwise
    q = spec("qgalore_adamw8bit")
    assert q.rewrites_model and q.sharding == "none" and q.external_grads and q.layerwise_capable and not q.layerwise
    assert spec("adamw8bit", layerwise=True).layerwise and spec("qgalore_adamw8bit", layerwise=True).layerwise
    assert not spec("apollo_adamw").layerwise_capable and not spec("fira_adamw").layerwise_capable
    # LISA inherits its inner optimizer's needs, never the layer-wise mode
    lisa = spec("lisa", inner="galore_adamw", rank=4)
    assert lisa.whole_matrices and lisa.lowrank_grads and not lisa.layerwise_capable


def test_trainer_and_federated_share_the_run_pieces():
    """Both build optimizer arguments with one function and end a run with one wrap-up."""
    for mod in ("trainer/trainer.py", "federated/server.py"):
        text = (ROOT / mod).read_text()
        assert "optimizer_kwargs(" in text and "finish_run(" in text and "write_run_config(" in text, mod
    federated = "\n".join(p.read_text() for p in (ROOT / "federated").glob("*.py"))
    assert "..trainer" not in federated and "slimtrain.trainer" not in federated


def test_trainer_train_reads_in_under_100_lines():
    tree = ast.parse((ROOT / "trainer" / "trainer.py").read_text())
    train = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert train.end_lineno - train.lineno + 1 < 100
