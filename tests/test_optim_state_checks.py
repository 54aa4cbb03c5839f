"""Issue 12, point 7: every optimizer's load_state_dict checks shapes, dtypes and the state
format before loading (ValueError naming the parameter and what differs); argument checks as
torch's; complex parameters refused."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from slimtrain.optim import AdamW8bit, GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from slimtrain.optim.lisa import LISA
from slimtrain.optim.mezo import MeZO


class Tiny(nn.Module):
    def __init__(self, width=64, layers=2):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _stepped(opt, model, width):
    torch.manual_seed(0)
    for _ in range(2):
        model(torch.randn(4, width)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    return opt.state_dict()


def _galore_groups(model, rank=4):
    mats = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": mats, "rank": rank, "update_proj_gap": 10, "scale": 0.25}, {"params": rest}]


def test_adamw8bit_refuses_a_state_saved_for_other_shapes():
    small, big = Tiny(64), Tiny(96)
    sd = _stepped(AdamW8bit(small.parameters(), min_8bit_size=0), small, 64)
    opt = AdamW8bit(big.parameters(), min_8bit_size=0)
    with pytest.raises(ValueError, match=r"AdamW8bit.load_state_dict: parameter 0 \(group 0, shape \(96, 96\)\): "
                                         r"state 'exp_avg_codes' has shape \(64, 64\), expected \(96, 96\)"):
        opt.load_state_dict(sd)


def test_galore_adamw8bit_refuses_a_state_saved_for_other_shapes():
    small, big = Tiny(64), Tiny(96)
    sd = _stepped(GaLoreAdamW8bit(_galore_groups(small), min_8bit_size=0), small, 64)
    opt = GaLoreAdamW8bit(_galore_groups(big), min_8bit_size=0)
    with pytest.raises(ValueError, match=r"parameter 0 .*proj_(left|right) has shape"):
        opt.load_state_dict(sd)


def test_torch_adamw_state_into_adamw8bit_is_refused():
    model = Tiny(64)
    sd = _stepped(torch.optim.AdamW(model.parameters()), model, 64)
    with pytest.raises(ValueError, match=r"parameter 0 .*fp32 moments.*8-bit moments.*torch.optim.AdamW"):
        AdamW8bit(model.parameters(), min_8bit_size=0).load_state_dict(sd)


@pytest.mark.parametrize("source, target, saved_by", [
    ("galore_adamw", "galore_adafactor", "GaLoreAdamW"),
    ("lisa", "galore_adamw", "LISA"),
    ("mezo", "adamw8bit", "MeZO"),
])
def test_a_state_of_another_optimizer_is_named_not_a_keyerror(source, target, saved_by):
    model = Tiny(64)

    def build(name, m):
        if name == "galore_adamw":
            return GaLoreAdamW(_galore_groups(m), lr=1e-3)
        if name == "galore_adafactor":
            return GaLoreAdafactor(_galore_groups(m), lr=1e-3, relative_step=False, scale_parameter=False)
        if name == "lisa":
            return LISA(m, n_active=1, interval=1, optimizer=torch.optim.AdamW(m.parameters()), layers="layers")
        if name == "mezo":
            return MeZO(list(m.parameters()), lr=1e-3)
        return AdamW8bit(m.parameters(), min_8bit_size=0)

    src = build(source, model)
    if source == "mezo":
        src.step(lambda: model(torch.randn(4, 64)).pow(2).sum().detach())
        sd = src.state_dict()
    else:
        sd = _stepped(src, model, 64)
    with pytest.raises(ValueError, match=rf"saved by {saved_by}, not "):
        build(target, Tiny(64)).load_state_dict(sd)


def test_own_state_still_round_trips():
    for make in (lambda m: AdamW8bit(m.parameters(), min_8bit_size=0),
                 lambda m: GaLoreAdamW8bit(_galore_groups(m), min_8bit_size=0),
                 lambda m: GaLoreAdafactor(_galore_groups(m), lr=1e-3, relative_step=False)):
        model = Tiny(64)
        opt = make(model)
        sd = _stepped(opt, model, 64)
        twin_model = Tiny(64)
        twin_model.load_state_dict(model.state_dict())
        twin = make(twin_model)
        buf = io.BytesIO()  # through a checkpoint file: state_dict() shares the live tensors
        torch.save(sd, buf)
        buf.seek(0)
        twin.load_state_dict(torch.load(buf, weights_only=True))  # the optimizer's own format loads
        # and continues exactly: one more step from the loaded state equals one more from the original
        x = torch.randn(4, 64)
        for m, o in ((model, opt), (twin_model, twin)):
            m(x).pow(2).sum().backward()
            o.step()
        for a, b in zip(model.parameters(), twin_model.parameters()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("lr", [-1.0, float("nan")])
def test_galore_adafactor_rejects_bad_lr(lr):
    with pytest.raises(ValueError, match=r"lr=.* must be >= 0"):
        GaLoreAdafactor(Tiny().parameters(), lr=lr, relative_step=False)


@pytest.mark.parametrize("kw, word", [({"eps": (-1.0, 1e-3)}, "eps="), ({"clip_threshold": 0.0}, "clip_threshold="),
                                      ({"decay_rate": 0.5}, "decay_rate="), ({"weight_decay": -1.0}, "weight_decay=")])
def test_galore_adafactor_argument_checks(kw, word):
    with pytest.raises(ValueError, match=word):
        GaLoreAdafactor(Tiny().parameters(), lr=1e-3, relative_step=False, **kw)


@pytest.mark.parametrize("scale", [-0.25, float("nan"), float("inf")])
def test_negative_or_non_finite_galore_scale_is_refused(scale):
    model = Tiny()
    groups = _galore_groups(model)
    groups[0]["scale"] = scale
    with pytest.raises(ValueError, match=r"scale=.* must be a positive number"):
        GaLoreAdamW(groups, lr=1e-3)


@pytest.mark.parametrize("make", [
    lambda ps: AdamW8bit(ps), lambda ps: GaLoreAdamW([{"params": ps, "rank": 2}]),
    lambda ps: GaLoreAdamW8bit([{"params": ps, "rank": 2}]), lambda ps: GaLoreAdafactor(ps),
    lambda ps: MeZO(ps, lr=1e-3)], ids=["adamw8bit", "galore_adamw", "galore_adamw8bit", "galore_adafactor", "mezo"])
def test_complex_parameters_are_refused_clearly(make):
    p = nn.Parameter(torch.randn(8, 8, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"parameter 0 \(shape \(8, 8\)\) is complex"):
        make([p])
