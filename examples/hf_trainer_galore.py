"""A transformers.Trainer that trains a small Llama with slimtrain's GaLore-AdamW (CPU, offline).

    python examples/hf_trainer_galore.py
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from slimtrain.integrations.hf import SlimtrainHFTrainer
from slimtrain.run.config import DataConfig
from slimtrain.run.data import ByteTokenizer, pack


class Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def main():
    data = pack(DataConfig(seq_len=64), ByteTokenizer())  # the built-in English corpus
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=257, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))
    args = TrainingArguments(output_dir="runs/hf_galore", per_device_train_batch_size=8, max_steps=100,
                             learning_rate=4e-3, warmup_steps=10, lr_scheduler_type="cosine", logging_steps=10,
                             save_strategy="no", report_to=[], use_cpu=True)
    trainer = SlimtrainHFTrainer(model=model, args=args, train_dataset=Blocks(data.train),
                                 slimtrain_optim="galore_adamw",
                                 slimtrain_optim_args={"rank": 32, "update_proj_gap": 50, "scale": 0.25})
    trainer.train()
    print("eval loss:", trainer.evaluate(Blocks(data.eval))["eval_loss"])


if __name__ == "__main__":
    main()
