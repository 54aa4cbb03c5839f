"""slimtrain optimizers inside a real transformers.Trainer on a tiny Llama and real text."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from helpers import text_batches, tiny_llama
from slimtrain.integrations.hf import SlimtrainHFTrainer, slimtrain_optimizer_cls_and_kwargs
from slimtrain.optim import GaLoreAdamW


class _Blocks(Dataset):
    def __init__(self):
        self.rows = torch.cat(text_batches(6, batch=4, seq=32))  # (24, 32) byte ids of real English

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def _args(tmp_path):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=12,
                             learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, disable_tqdm=True, seed=0)


def _unwrap(opt):
    return getattr(opt, "optimizer", opt)  # accelerate wraps the optimizer


def _loss_curve(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("style", ["subclass", "optimizer_cls_and_kwargs"])
def test_transformers_trainer_uses_galore(tmp_path, style):
    from transformers import Trainer

    model = tiny_llama()
    galore = {"rank": 8, "update_proj_gap": 4, "scale": 0.25}
    if style == "subclass":
        trainer = SlimtrainHFTrainer(model=model, args=_args(tmp_path), train_dataset=_Blocks(),
                                     slimtrain_optim="galore_adamw", slimtrain_optim_args=galore)
    else:
        trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_Blocks(),
                          optimizer_cls_and_kwargs=slimtrain_optimizer_cls_and_kwargs("galore_adamw", lr=3e-3,
                                                                                      **galore))
    trainer.train()
    opt = _unwrap(trainer.optimizer)
    assert isinstance(opt, GaLoreAdamW)
    assert any("proj_left" in s or "proj_right" in s for s in opt.state.values())  # GaLore really ran
    assert opt.param_groups[0]["initial_lr"] == 3e-3
    curve = _loss_curve(trainer)
    assert len(curve) == 12 and sum(curve[-3:]) / 3 < curve[0] - 0.3, curve


def test_unknown_optimizer_is_named(tmp_path):
    trainer = SlimtrainHFTrainer(model=tiny_llama(), args=_args(tmp_path), train_dataset=_Blocks(),
                                 slimtrain_optim="adamm")
    with pytest.raises(ValueError, match="unknown slimtrain optimizer 'adamm'.*galore_adamw"):
        trainer.create_optimizer()
