"""Fine-tuning tasks (lm / sft / classification), their metrics, export and the bad-input errors.

A tiny randomly initialised Llama with tied embeddings and a word-level tokenizer trained here
(no SmolLM2 needed), over the first rows of the real GLUE SST-2 file as GLUE ships it (TSV).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil

import pytest
import torch
import torch.nn.functional as F
from helpers import SHARED_DATA

from slimtrain.run.config import load_config
from slimtrain.run.data import DataError

SST2 = SHARED_DATA / "glue_sst2_train.tsv"
WORDS = {0: " terrible", 1: " great"}
TEMPLATE = "{sentence} It was"


def _sst2_rows(n: int, skip: int = 0) -> list[str]:
    lines = SST2.read_text().splitlines()
    return lines[1 + skip: 1 + skip + n]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> pathlib.Path:
    """A model directory (tiny tied Llama + its tokenizer), an SST-2 slice (train / dev TSV) and sft jsonl."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("finetune")
    train, dev = _sst2_rows(48), _sst2_rows(16, skip=48)
    (root / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(train) + "\n")
    (root / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(dev) + "\n")
    sft = [{"prompt": f"Review: {r.split(chr(9))[0]} Sentiment:", "response": ["bad", "good"][int(r.split(chr(9))[1])]}
           for r in train[:24]]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    words = sorted({w for r in train + dev for w in r.split("\t")[0].split()}
                   | {"It", "was", "terrible", "great", "Review:", "Sentiment:", "bad", "good"})
    vocab = {"[UNK]": 0, "[PAD]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    model_dir = root / "model"
    fast.save_pretrained(model_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      tie_word_embeddings=True, eos_token_id=2, pad_token_id=1, bos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    return root


def _overrides(root, out, task="classification", **extra) -> list[str]:
    args = {"output_dir": out, "model.name": root / "model", "data.task": task, "data.seq_len": 48,
            "train.batch_size": 4, "train.steps": 4, "train.warmup_steps": 0, "train.eval_every": 0,
            "train.progress": "false", "optim.lr": 1e-3, "checkpoint.every": 0}
    if task == "classification":
        args.update({"data.files": f"[{root / 'train.tsv'}]", "data.eval_files": f"[{root / 'dev.tsv'}]",
                     "data.template": f"'{TEMPLATE}'", "data.label_words": "{0: ' terrible', 1: ' great'}"})
    elif task == "sft":
        args.update({"data.files": f"[{root / 'sft.jsonl'}]", "data.eval_fraction": 0.25})
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def _trainer(root, out, task="classification", **extra):
    from slimtrain.trainer.trainer import Trainer

    return Trainer(load_config(None, _overrides(root, out, task, **extra)))


# ---------------------------------------------------------------------------- each task trains
@pytest.mark.parametrize("task", ["classification", "sft"])
def test_task_trains_and_reports_its_metrics(root, tmp_path, task):
    t = _trainer(root, str(tmp_path / "run"), task, **{"train.steps": 6, "optim.lr": 3e-3})
    with torch.no_grad():
        first = float(t.loss_of(t.model, next(t.micro_batches(0))))
    summary = t.train()
    t.close()
    assert summary["final_eval_loss"] > 0 and torch.isfinite(torch.tensor(summary["final_eval_loss"]))
    if task == "classification":
        assert 0.0 <= summary["final_eval_accuracy"] <= 1.0
    else:
        assert summary["final_eval_ppl"] > 1
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert lines[-1]["eval_loss"] == summary["final_eval_loss"]
    assert lines[-2]["loss"] < first  # the training loss went down from the first micro-batch's


def test_batches_pad_right_and_mask_everything_but_the_answer(root, tmp_path):
    t = _trainer(root, str(tmp_path / "run"))
    b = next(t.micro_batches(0))
    lengths = b["attention_mask"].sum(1)
    assert b["input_ids"].shape[1] == int(lengths.max())  # padded to the longest of the batch
    for row in range(len(lengths)):
        n = int(lengths[row])
        assert (b["attention_mask"][row, :n] == 1).all() and (b["attention_mask"][row, n:] == 0).all()
        answer = (b["labels"][row] != -100).nonzero().flatten().tolist()
        assert answer == [n - 1]  # only the label word carries a label
        assert int(b["labels"][row, n - 1]) in t.task.label_ids
    t.close()


def test_sft_loss_is_the_response_tokens_only(root, tmp_path):
    t = _trainer(root, str(tmp_path / "run"), "sft")
    b = next(t.micro_batches(0))
    with torch.no_grad():
        loss = float(t.loss_of(t.model, b))
        # by hand: cross entropy of each response token given everything before it, unpadded
        total, count = 0.0, 0
        for row in range(len(b["input_ids"])):
            n = int(b["attention_mask"][row].sum())
            logits = t.model(input_ids=b["input_ids"][row: row + 1, :n]).logits[0].double()
            for pos in range(1, n):
                if int(b["labels"][row, pos]) != -100:
                    total += float(F.cross_entropy(logits[pos - 1], b["input_ids"][row, pos]))
                    count += 1
    eos = t.tokenizer.eos_token_id
    assert all(int(b["labels"][r][b["labels"][r] != -100][-1]) == eos for r in range(len(b["labels"])))
    assert loss == pytest.approx(total / count, rel=1e-5)
    t.close()


def test_label_word_scoring_equals_a_hand_computation(root, tmp_path):
    t = _trainer(root, str(tmp_path / "run"))
    metrics = t.evaluate()
    tok = t.tokenizer.tok
    words = [tok.encode(w, add_special_tokens=False)[0] for w in WORDS.values()]
    lines = (root / "dev.tsv").read_text().splitlines()[1:]
    correct, losses = 0, []
    with torch.no_grad():
        for line in lines:
            sentence, label = line.split("\t")
            ids = tok.encode(TEMPLATE.format(sentence=sentence), add_special_tokens=False)
            last = t.model(input_ids=torch.tensor([ids])).logits[0, -1].double()  # one example, no padding
            correct += int(torch.argmax(last[words]) == int(label))
            losses.append(float(F.cross_entropy(last, torch.tensor(words[int(label)]))))
    assert metrics["eval_accuracy"] == correct / len(lines)
    assert metrics["eval_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    t.close()


def test_classification_resume_is_bit_exact(root, tmp_path):
    from slimtrain.trainer.trainer import Trainer

    extra = {"train.steps": 4, "checkpoint.every": 2}
    full = _trainer(root, str(tmp_path / "a"), **extra)
    full.train()
    full.close()
    crashed = _trainer(root, str(tmp_path / "b"), **extra)
    crashed.cfg.train.steps = 2  # stop early; the schedule was built for 4 steps, as in the full run
    crashed.train()
    crashed.close()
    resumed = Trainer(load_config(None, _overrides(root, str(tmp_path / "b"), **extra)), resume=True)
    resumed.train()
    resumed.close()
    assert resumed.resumed_from.endswith("step_00000002")
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


# ---------------------------------------------------------------------------- export
def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("optim,args", [
    ("adamw", {}),
    ("qgalore_adamw8bit", {"optim.args.rank": 4, "optim.args.update_proj_gap": 2, "optim.args.weight_group_size": 32}),
    ("lisa", {"optim.args.n_active": 1, "optim.args.interval": 2}),
])
def test_export_round_trip_gives_the_trainers_logits_and_accuracy(root, tmp_path, optim, args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    t = _trainer(root, str(tmp_path / "run"), **{"optim.name": optim, "export.dir": out, "train.steps": 3, **args})
    summary = t.train()
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= set(os.listdir(out))
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied embeddings stay tied
    if optim == "qgalore_adamw8bit":
        quant = t.model.model.layers[0].self_attn.q_proj
        assert quant.weight.dtype == torch.int8  # the trainer's copy is INT8; the export its dequantized values
        assert torch.equal(loaded.model.layers[0].self_attn.q_proj.weight, quant.dequantized_weight())
    batch = t.task._collate(t.task.eval)
    t.model.eval()
    torch.testing.assert_close(_logits(loaded, batch), _logits(t.model, batch), rtol=1e-5, atol=1e-5)
    again = t.task.evaluate(loaded, 4, torch.device("cpu"))
    assert again["eval_accuracy"] == summary["final_eval_accuracy"]
    assert again["eval_loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-5)
    assert AutoTokenizer.from_pretrained(out).encode(" great", add_special_tokens=False) == [t.task.label_ids[1]]
    t.close()


def test_cli_export_of_a_checkpoint_and_eval_of_both(root, tmp_path, capsys):
    from slimtrain.launch.cli import main

    run = tmp_path / "run"
    t = _trainer(root, str(run), **{"optim.name": "qgalore_adamw8bit", "optim.args.rank": 4,
                                    "optim.args.weight_group_size": 32, "train.steps": 2})
    summary = t.train()
    t.close()
    ckpt = summary["checkpoint"]
    assert main(["export", ckpt, str(tmp_path / "hf")]) == 0
    from slimtrain.run.scoring import config_of_checkpoint, score

    from_ckpt = score(config_of_checkpoint(ckpt), ckpt)
    cfg = load_config(None, _overrides(root, str(tmp_path / "x"), **{"model.name": tmp_path / "hf"}))
    from_hf = score(cfg)
    assert from_ckpt["eval_accuracy"] == from_hf["eval_accuracy"] == summary["final_eval_accuracy"]
    assert from_hf["eval_loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-5)
    assert from_ckpt["eval_loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-5)
    zero_shot = score(load_config(None, _overrides(root, str(tmp_path / "y"))))
    assert zero_shot["examples"] == 16 and 0 <= zero_shot["eval_accuracy"] <= 1
    capsys.readouterr()
    assert main(["eval", "--checkpoint", ckpt]) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli == from_ckpt
    assert main(["eval", "--checkpoint", ckpt, "data.label_words={0: ' terrible film', 1: ' great'}"]) == 2
    # a checkpoint whose weights no longer match its manifest is refused, not exported
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    with open(bad / "model.pt", "r+b") as fh:
        fh.seek(-64, os.SEEK_END)
        fh.write(b"\x00" * 16)
    capsys.readouterr()
    assert main(["export", str(bad), str(tmp_path / "hf_bad")]) == 2
    assert "fails verification" in capsys.readouterr().err and not (tmp_path / "hf_bad").exists()


# ---------------------------------------------------------------------------- tied weights, targets
@pytest.mark.parametrize("optim", ["adamw", "adamw8bit", "galore_adamw", "galore_adamw8bit", "lisa", "mezo",
                                   "sparse_mezo"])
def test_tied_embeddings_are_one_tensor_with_one_state(root, optim):
    from transformers import AutoModelForCausalLM

    from slimtrain.optim.registry import build_optimizer

    model = AutoModelForCausalLM.from_pretrained(root / "model")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    kwargs = {"rank": 4} if "galore" in optim else {}
    opt = build_optimizer(optim, model, lr=1e-3, **kwargs)
    held = [p for g in opt.param_groups for p in g["params"]]
    assert len(held) == len({id(p) for p in held}) == len(list(model.parameters()))
    assert sum(p is model.lm_head.weight for p in held) == 1


def test_target_modules_choose_what_qgalore_quantizes_and_galore_projects(root):
    from transformers import AutoModelForCausalLM

    from slimtrain.optim.qgalore import QuantLinear
    from slimtrain.optim.registry import build_optimizer

    model = AutoModelForCausalLM.from_pretrained(root / "model")
    build_optimizer("qgalore_adamw8bit", model, lr=1e-3, rank=4, weight_group_size=32,
                    target_modules=["q_proj", "v_proj"])
    quant = sorted(n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, QuantLinear))
    assert quant == ["q_proj", "q_proj", "v_proj", "v_proj"]
    model = AutoModelForCausalLM.from_pretrained(root / "model")
    opt = build_optimizer("galore_adamw", model, lr=1e-3, rank=4, target_modules=["down_proj"])
    projected = {id(p) for g in opt.param_groups if "rank" in g for p in g["params"]}
    assert projected == {id(layer.mlp.down_proj.weight) for layer in model.model.layers}


# ---------------------------------------------------------------------------- bad input
def _bad(root, tmp_path, rows: str, ext="tsv", task="classification", **extra):
    bad = tmp_path / f"bad.{ext}"
    bad.write_text(rows)
    over = {"data.files": f"[{bad}]", **extra}
    with pytest.raises(DataError) as e:
        _trainer(root, str(tmp_path / "run"), task, **over)
    return str(e.value), str(bad)


def test_a_label_outside_the_label_words_names_file_row_and_field(root, tmp_path):
    msg, path = _bad(root, tmp_path, "sentence\tlabel\ngood film\t1\nbad film\t2\n")
    assert path in msg and "row 1" in msg and "'label'" in msg and "'2'" in msg


def test_a_missing_field_names_file_row_and_field(root, tmp_path):
    msg, path = _bad(root, tmp_path, "sentence\tlabel\ngood film\t1\n\t0\n")
    assert path in msg and "row 1" in msg and "'sentence'" in msg
    msg, path = _bad(root, tmp_path, '{"sentence": "good film", "label": 1}\n{"label": 0}\n', ext="jsonl")
    assert path in msg and "row 1" in msg and "'sentence'" in msg


def test_an_empty_response_names_file_row_and_field(root, tmp_path):
    rows = '{"prompt": "Review: good", "response": "good"}\n{"prompt": "Review: bad", "response": " "}\n'
    msg, path = _bad(root, tmp_path, rows, ext="jsonl", task="sft")
    assert path in msg and "row 1" in msg and "'response'" in msg


def test_a_template_longer_than_seq_len_is_an_error_and_truncation_is_counted(root, tmp_path):
    long_template = "'{sentence} " + " ".join(["great"] * 60) + " It was'"
    msg, path = _bad(root, tmp_path, "sentence\tlabel\ngood film\t1\n", **{"data.template": long_template})
    assert path in msg and "row 0" in msg and "data.seq_len" in msg
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "model")
    rows = [r.split("\t")[0] for f in ("train.tsv", "dev.tsv") for r in (root / f).read_text().splitlines()[1:]]
    too_long = sum(len(tok.encode(TEMPLATE.format(sentence=r), add_special_tokens=False)) > 7 for r in rows)
    with pytest.warns(UserWarning, match=rf"{too_long} example\(s\) longer than data.seq_len=8 .* on the left"):
        t = _trainer(root, str(tmp_path / "run"), **{"data.seq_len": 8})
    # left truncation keeps the template's words next to the answer
    words = t.tokenizer.decode(t.task.eval[0].prompt).split()
    assert words[-2:] == ["It", "was"] and len(t.task.eval[0].prompt) <= 7
    t.close()


def test_chat_messages_without_a_chat_template_is_an_error(root, tmp_path):
    rows = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "good"}]}\n'
    msg, path = _bad(root, tmp_path, rows, ext="jsonl", task="sft")
    assert path in msg and "chat template" in msg


def test_multi_token_label_word_is_an_error(root, tmp_path):
    with pytest.raises(DataError, match="must be one token"):
        _trainer(root, str(tmp_path / "run"), **{"data.label_words": "{0: ' terrible film', 1: ' great'}"})


# ---------------------------------------------------------------------------- fine-tuning defaults
FINETUNE = sorted((pathlib.Path(__file__).resolve().parents[1] / "docs" / "configs").glob("finetune_*.yaml"))


@pytest.mark.parametrize("path", FINETUNE, ids=[p.stem for p in FINETUNE])
def test_finetune_defaults_train_a_classification_task(root, tmp_path, path):
    from slimtrain.trainer.trainer import Trainer

    cfg = load_config(str(path))
    assert cfg.optim.name == path.stem[len("finetune_"):] and cfg.data.task == "classification"
    extra = {"optim.args.rank": 4} if "rank" in cfg.optim.args else {}
    if "weight_group_size" in cfg.optim.args:
        extra["optim.args.weight_group_size"] = 32
    if "n_active" in cfg.optim.args:  # the tiny model has 2 layers
        extra["optim.args.n_active"] = 1
    t = Trainer(load_config(str(path), _overrides(root, str(tmp_path / "o"), **{"train.steps": 2,
                                                                                  "optim.lr": cfg.optim.lr,
                                                                                  "train.warmup_steps": 0,
                                                                                  **extra})))
    try:
        summary = t.train()
    finally:
        t.close()
    assert 0 <= summary["final_eval_accuracy"] <= 1 and math.isfinite(summary["final_eval_loss"])


# ---------------------------------------------------------------------------- bf16 weights
@pytest.mark.parametrize("optim", ["adamw", "adamw8bit", "galore_adamw", "galore_adamw8bit", "lisa", "mezo",
                                   "sparse_mezo"])
def test_bf16_weights_fine_tune(root, tmp_path, optim):
    extra = {"model.dtype": "bfloat16", "optim.name": optim, "train.steps": 2, "export.dir": tmp_path / "hf"}
    if "galore" in optim:
        extra["optim.args.rank"] = 4
    if optim == "lisa":
        extra["optim.args.n_active"] = 1
    t = _trainer(root, str(tmp_path / "run"), **extra)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    summary = t.train()
    t.close()
    assert all(p.dtype == torch.bfloat16 for p in t.model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in t.model.state_dict().items())  # the weights moved
    assert math.isfinite(summary["final_eval_loss"])
