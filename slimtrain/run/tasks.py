"""What a run trains on and how it is scored: ``data.task`` = ``lm`` | ``sft`` | ``classification``.

A task turns sample ids into a micro-batch dict (``input_ids``, ``labels`` and, when examples
are padded, ``attention_mask``) that goes straight into a Hugging Face causal LM, and scores a
model on its held-out split (:meth:`Task.evaluate` returns a dict of ``eval_*`` metrics).

- ``lm``: today's packing (:func:`slimtrain.run.data.pack`); metrics: eval loss and perplexity.
- ``sft``: prompt/response pairs (or chat ``messages`` rendered with the tokenizer's chat
  template); labels are -100 outside the response, so the loss is the response's only; metric:
  the held-out response loss (token-weighted) and its perplexity.
- ``classification``: a text (or a text pair) and a label, rendered through ``data.template``
  with one *label word* per class (MeZO's prompt-based recipe: ``"{sentence} It was"`` ->
  ``" great"`` / ``" terrible"``); the loss is the LM loss on the label word, the accuracy is the
  argmax over the label words' logits at the answer position.

Examples are padded (right side) to the longest in the micro-batch, never packed. An over-long
prompt is cut on ``data.truncation_side`` inside its longest field, so a template's fixed words
(" It was") always stay next to the answer; every cut example is counted and warned about once.
Bad rows (a missing field, a label outside ``data.label_words``, an empty response, a prompt
whose fixed part alone exceeds ``data.seq_len``) raise one :class:`DataError` naming the file,
the row and the field, before any training.

The sample order is the trainer's :class:`~slimtrain.run.data.BlockOrder` over example ids, a
pure function of ``(seed, position)``, so resume stays bit-exact.
"""

from __future__ import annotations

import abc
import contextlib
import math
import os
import string
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import DataConfig
from .data import DataError, PackedData, pack, resolve_files

IGNORE = -100  # label value the Hugging Face losses skip


# ---------------------------------------------------------------------------- rows from files
_ROW_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "tsv"}


def _row_format(path: str, fmt: str) -> str:
    if os.path.isdir(path):
        return "disk"
    if fmt != "auto":
        return fmt
    ext = os.path.splitext(path)[1].lower()
    if ext not in _ROW_FORMATS:
        raise DataError(f"{path!r}: cannot tell the format from {ext!r}; set data.format to one of "
                        "['json', 'parquet', 'csv', 'tsv', 'disk']")
    return _ROW_FORMATS[ext]


def load_rows(path: str, fmt: str = "auto"):
    """One local file (or a ``save_to_disk`` directory) as a ``datasets.Dataset``.

    TSV files are read as GLUE ships them: a header line, tab-separated, no quoting (SST-2
    sentences contain bare quotes), and strings such as "null" kept as text.
    """
    import datasets

    datasets.disable_progress_bars()
    kind = _row_format(path, fmt)
    try:
        if kind == "disk":
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                split = "train" if "train" in ds else next(iter(ds))
                ds = ds[split]
            return ds
        kwargs = {}
        if kind in ("csv", "tsv"):
            kwargs = dict(quoting=3, keep_default_na=False)  # csv.QUOTE_NONE
            if kind == "tsv":
                kwargs["delimiter"] = "\t"
        return datasets.load_dataset("csv" if kind == "tsv" else kind, data_files=[path], split="train",
                                     keep_in_memory=True, **kwargs)
    except Exception as e:  # a malformed file: name it and the format we tried
        raise DataError(f"{path!r} could not be read as {kind!r}: {type(e).__name__}: {e}") from e


def _paths(patterns: list[str]) -> list[str]:
    out = []
    for pattern in patterns:
        if os.path.isdir(os.path.expanduser(pattern)):
            out.append(os.path.expanduser(pattern))
        else:
            out += resolve_files([pattern])
    return out


def _where(path: str, row: int, kind: str) -> str:
    line = {"csv": row + 2, "tsv": row + 2, "json": row + 1}.get(kind)
    return f"{path}: row {row}" + (f" (line {line})" if line is not None and not path.endswith(".json") else "")


# ---------------------------------------------------------------------------- prompt templates
def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


@dataclass
class Example:
    prompt: list[int]  # token ids of the rendered prompt
    answer: list[int]  # the label word's token (classification) or the response tokens (sft)
    label: int = -1  # classification: index into the label words


class _Truncation:
    """Cuts over-long prompts inside their longest field and counts the cut examples."""

    def __init__(self, side: str):
        self.side, self.count, self.first = side, 0, None

    def fit(self, tokenizer, template: str, row: dict, budget: int, where: str) -> list[int]:
        ids = tokenizer.encode(template.format(**row))
        if len(ids) <= budget:
            return ids
        fields = template_fields(template)
        empty = tokenizer.encode(template.format(**{k: "" for k in fields}))
        if len(empty) > budget:
            raise DataError(f"{where}: the prompt template alone is {len(empty)} tokens, longer than the "
                            f"{budget} that data.seq_len leaves for it; raise data.seq_len or shorten data.template")
        row = dict(row)
        for attempt in range(8):  # re-tokenising the rendered prompt can differ by a token or two
            name = max(fields, key=lambda k: len(str(row[k])))
            toks = tokenizer.encode(str(row[name]))
            excess = len(ids) - budget
            keep = max(0, len(toks) - excess - attempt)
            toks = toks[len(toks) - keep:] if self.side == "left" else toks[:keep]
            row[name] = tokenizer.decode(toks)
            ids = tokenizer.encode(template.format(**row))
            if len(ids) <= budget:
                break
        else:  # still over: cut the rendered prompt itself
            ids = ids[len(ids) - budget:] if self.side == "left" else ids[:budget]
        self.count += 1
        self.first = self.first or where
        return ids

    def report(self, what: str, seq_len: int) -> None:
        if self.count:
            warnings.warn(f"{what}: {self.count} example(s) longer than data.seq_len={seq_len} had their prompt "
                          f"truncated on the {self.side} (data.truncation_side; first: {self.first})",
                          stacklevel=3)


# ---------------------------------------------------------------------------- tasks
class Task(abc.ABC):
    """A run's data and its metrics. ``n_train`` examples, ``batch(ids)`` -> model inputs."""

    kind = "task"
    n_train: int
    n_eval: int

    @abc.abstractmethod
    def batch(self, ids: torch.Tensor) -> dict:
        """The model inputs (``input_ids``, ``labels``, maybe ``attention_mask``) of training examples ``ids``."""

    @abc.abstractmethod
    def evaluate(self, model, batch_size: int, device, rank: int = 0, world: int = 1, autocast=contextlib.nullcontext) -> dict:
        """The held-out metrics (``eval_loss`` and the task's own), over this rank's share, summed over ranks."""

    def describe(self) -> str:
        return f"{self.n_train} train / {self.n_eval} eval examples ({self.kind})"


def _all_reduce(stats: torch.Tensor, world: int, device) -> torch.Tensor:
    """``stats`` summed over ranks, the collective on ``device`` (NCCL refuses CPU tensors)."""
    if world > 1:
        import torch.distributed as dist

        moved = stats.to(device)
        dist.all_reduce(moved)
        stats = moved.to(stats.device)
    return stats


class LMTask(Task):
    """Packed next-token blocks (:func:`pack`): the default task."""

    kind = "lm"

    def __init__(self, cfg: DataConfig, tokenizer, eval_only: bool = False):
        self.cfg = cfg
        self.packed: PackedData = pack(cfg, tokenizer)
        self.n_train, self.n_eval = len(self.packed.train), len(self.packed.eval)

    def batch(self, ids: torch.Tensor) -> dict:
        x = self.packed.train[ids]  # (B, T)
        return {"input_ids": x, "labels": x}

    def describe(self) -> str:
        return f"{self.n_train} train / {self.n_eval} eval blocks of {self.cfg.seq_len} tokens"

    @torch.no_grad()
    def evaluate(self, model, batch_size, device, rank=0, world=1, autocast=contextlib.nullcontext) -> dict:
        """Mean loss over the held-out blocks (sharded over ranks, summed exactly) and perplexity."""
        mine = self.packed.eval[rank::world]
        stats = torch.zeros(2, dtype=torch.float64)  # (sum of per-block losses, blocks)
        for i in range(0, len(mine), batch_size):
            ids = mine[i: i + batch_size].to(device)
            with autocast():
                loss = model(input_ids=ids, labels=ids).loss.float()
            stats += torch.tensor([float(loss) * len(ids), len(ids)], dtype=torch.float64)
        stats = _all_reduce(stats, world, device)
        mean = float(stats[0] / stats[1])
        return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0))}


class _PaddedTask(Task):
    """Examples of prompt + answer tokens, padded to the longest of each micro-batch."""

    def __init__(self, cfg: DataConfig, tokenizer, eval_only: bool = False):
        self.cfg, self.tokenizer = cfg, tokenizer
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else tokenizer.eos_token_id
        if not cfg.files and not (eval_only and cfg.eval_files):
            raise DataError(f"data.task={cfg.task!r} needs data.files (the built-in corpus is plain text)"
                            + (" or data.eval_files" if eval_only else ""))
        self.truncation = _Truncation(cfg.truncation_side)
        train = self._read(_paths(cfg.files)) if not (eval_only and cfg.eval_files) else [None]
        if cfg.eval_files:
            self.train, self.eval = train, self._read(_paths(cfg.eval_files))
        else:  # every k-th row held out, as the lm task holds out every k-th block
            k = max(2, round(1.0 / cfg.eval_fraction))
            self.train = [e for i, e in enumerate(train) if i % k != k - 1]
            self.eval = [e for i, e in enumerate(train) if i % k == k - 1]
        if cfg.max_eval_examples:
            self.eval = self.eval[: cfg.max_eval_examples]
        if not self.train or not self.eval:
            raise DataError(f"data.files={cfg.files!r}: {len(self.train)} training and {len(self.eval)} eval "
                            "examples; both splits need at least one (add rows or set data.eval_files)")
        self.truncation.report(f"data.task={cfg.task}", cfg.seq_len)
        self.n_train, self.n_eval = len(self.train), len(self.eval)

    def _read(self, paths: list[str]) -> list[Example]:
        out = []
        for path in paths:
            rows = load_rows(path, self.cfg.format)
            kind = _row_format(path, self.cfg.format)
            out += self._examples(rows, path, kind)
        return out

    @abc.abstractmethod
    def _examples(self, rows, path: str, kind: str) -> list[Example]:
        """The task's examples from one file's ``rows`` (``kind``: its format), bad rows named."""

    @staticmethod
    def _require(rows, path: str, kind: str, fields: list[str], what: str) -> list[dict]:
        """Rows as dicts; a missing column or an empty value -> DataError naming file, row and field."""
        missing = [f for f in fields if f not in rows.column_names]
        if missing:
            raise DataError(f"{path}: no column {missing[0]!r} ({what}); columns: {rows.column_names}")
        cols = {f: rows[f] for f in fields}
        out = []
        for i in range(len(rows)):
            row = {f: cols[f][i] for f in fields}
            for f, v in row.items():
                if v is None or (isinstance(v, str) and not v.strip()):
                    raise DataError(f"{_where(path, i, kind)}: field {f!r} is empty or missing ({what})")
            out.append(row)
        return out

    def _collate(self, examples: list[Example]) -> dict:
        """Right-padded (B, T) inputs; labels are -100 on the prompt and on padding."""
        width = max(len(e.prompt) + len(e.answer) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        for b, e in enumerate(examples):
            n, a = len(e.prompt), len(e.answer)
            ids[b, : n + a] = torch.tensor(e.prompt + e.answer)
            mask[b, : n + a] = 1
            labels[b, n: n + a] = torch.tensor(e.answer)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def batch(self, ids: torch.Tensor) -> dict:
        return self._collate([self.train[int(i)] for i in ids])

    def _eval_batches(self, batch_size: int, rank: int, world: int):
        """This rank's held-out examples in length order (less padding), as collated batches."""
        mine = self.eval[rank::world]
        order = sorted(range(len(mine)), key=lambda i: len(mine[i].prompt) + len(mine[i].answer))
        for s in range(0, len(order), batch_size):
            chunk = [mine[i] for i in order[s: s + batch_size]]
            yield chunk, self._collate(chunk)


class SFTTask(_PaddedTask):
    """Prompt/response pairs (or chat messages); the loss covers the response tokens only."""

    kind = "sft"

    def _examples(self, rows, path, kind):
        cfg, tok = self.cfg, self.tokenizer
        eos = [tok.eos_token_id]
        chat = cfg.prompt_field not in rows.column_names and cfg.messages_field in rows.column_names
        out = []
        if chat:
            render = getattr(tok, "chat_prompt", None)
            if render is None or not getattr(tok, "has_chat_template", False):
                raise DataError(f"{path}: rows hold chat {cfg.messages_field!r} but the tokenizer "
                                f"({cfg.tokenizer!r}) has no chat template; use a tokenizer with one, or "
                                f"prompt/response columns (data.prompt_field / data.response_field)")
            for i, messages in enumerate(rows[cfg.messages_field]):
                where = _where(path, i, kind)
                if not messages or messages[-1].get("role") != "assistant":
                    raise DataError(f"{where}: field {cfg.messages_field!r} must end with an assistant message "
                                    "(the response to learn)")
                if not str(messages[-1].get("content") or "").strip():
                    raise DataError(f"{where}: field {cfg.messages_field!r}: the assistant response is empty")
                prompt = tok.encode(render(messages[:-1]))
                answer = tok.encode(messages[-1]["content"]) + eos
                out.append(self._fit(prompt, answer, where))
            return out
        template = cfg.template or "{" + cfg.prompt_field + "}"
        fields = sorted(set(template_fields(template)) | {cfg.response_field})
        for i, row in enumerate(self._require(rows, path, kind, fields, "data.task=sft")):
            where = _where(path, i, kind)
            answer = tok.encode(str(row[cfg.response_field])) + eos
            budget = cfg.seq_len - min(len(answer), cfg.seq_len // 2)
            prompt = self.truncation.fit(tok, template, row, budget, where)
            out.append(self._fit(prompt, answer, where))
        return out

    def _fit(self, prompt: list[int], answer: list[int], where: str) -> Example:
        """Keep prompt + response within data.seq_len: the prompt is cut first, the response only
        past half of seq_len (its end, on the right)."""
        n = self.cfg.seq_len
        if len(prompt) + len(answer) <= n:
            return Example(prompt, answer)
        answer = answer[: max(n - len(prompt), n // 2)]
        keep = n - len(answer)
        if len(prompt) > keep:
            prompt = prompt[len(prompt) - keep:] if self.cfg.truncation_side == "left" else prompt[:keep]
        self.truncation.count += 1
        self.truncation.first = self.truncation.first or where
        return Example(prompt, answer)

    @torch.no_grad()
    def evaluate(self, model, batch_size, device, rank=0, world=1, autocast=contextlib.nullcontext) -> dict:
        """Held-out response loss, token-weighted: sum of response-token losses / their count."""
        stats = torch.zeros(2, dtype=torch.float64)
        for _, b in self._eval_batches(batch_size, rank, world):
            b = {k: v.to(device) for k, v in b.items()}
            with autocast():
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            shift = b["labels"][:, 1:]
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), shift.flatten(), ignore_index=IGNORE,
                                   reduction="sum")
            stats += torch.tensor([float(loss), float((shift != IGNORE).sum())], dtype=torch.float64)
        stats = _all_reduce(stats, world, device)
        mean = float(stats[0] / stats[1])
        return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0))}


class ClassificationTask(_PaddedTask):
    """Prompt-based classification with label words (the LM head is the classifier)."""

    kind = "classification"

    def __init__(self, cfg: DataConfig, tokenizer, eval_only: bool = False):
        if len(cfg.label_words) < 2:
            raise DataError(f"data.label_words={cfg.label_words!r}: data.task=classification needs one label word "
                            "per class (at least two), e.g. data.label_words=\"{0: ' terrible', 1: ' great'}\"")
        self.label_keys = [str(k) for k in cfg.label_words]
        words = [str(w) for w in cfg.label_words.values()]
        self.label_ids = []
        for key, word in zip(self.label_keys, words):
            ids = tokenizer.encode(word)
            if len(ids) != 1:
                raise DataError(f"data.label_words[{key!r}]={word!r} is {len(ids)} tokens {ids} for this tokenizer; "
                                "each label word must be one token (try it with or without a leading space)")
            self.label_ids.append(ids[0])
        if len(set(self.label_ids)) != len(self.label_ids):
            raise DataError(f"data.label_words={cfg.label_words!r}: two labels share a token")
        super().__init__(cfg, tokenizer, eval_only)

    def _text_fields(self, rows) -> list[str]:
        if self.cfg.text_fields:
            return list(self.cfg.text_fields)
        cols = rows.column_names
        if "sentence1" in cols and "sentence2" in cols:
            return ["sentence1", "sentence2"]
        return ["sentence"] if "sentence" in cols else ["text"]

    def template_for(self, rows) -> str:
        if self.cfg.template:
            return self.cfg.template
        return " ".join("{" + f + "}" for f in self._text_fields(rows))

    def _examples(self, rows, path, kind):
        cfg, tok = self.cfg, self.tokenizer
        template = self.template_for(rows)
        fields = sorted(set(template_fields(template)) | {cfg.label_field})
        index = {k: i for i, k in enumerate(self.label_keys)}
        out = []
        for i, row in enumerate(self._require(rows, path, kind, fields, "data.task=classification")):
            where = _where(path, i, kind)
            label = str(row.pop(cfg.label_field))
            if label not in index:
                raise DataError(f"{where}: field {cfg.label_field!r} = {label!r} is not one of the labels in "
                                f"data.label_words {self.label_keys}")
            prompt = self.truncation.fit(tok, template, row, cfg.seq_len - 1, where)
            out.append(Example(prompt, [self.label_ids[index[label]]], index[label]))
        return out

    def label_word_logits(self, model, batch: dict, autocast) -> torch.Tensor:
        """(B, C) logits of the label words at each example's answer position (the last prompt token)."""
        pos = (batch["attention_mask"].sum(1) - 2)  # (B,) the token before the label word
        keep = torch.unique(pos)  # the LM head runs only at the distinct answer positions
        with autocast():
            try:
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            logits_to_keep=keep)
                logits, where = out.logits, torch.searchsorted(keep, pos)  # (B, len(keep), V)
            except TypeError:  # a model without logits_to_keep: the full (B, T, V) logits
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                where = pos
        rows = torch.arange(len(pos), device=logits.device)
        return logits[rows, where].float()  # (B, V)

    @torch.no_grad()
    def evaluate(self, model, batch_size, device, rank=0, world=1, autocast=contextlib.nullcontext) -> dict:
        """Accuracy (argmax over the label words) and the label-word LM loss, over the held-out split."""
        stats = torch.zeros(3, dtype=torch.float64)  # (sum of losses, correct, examples)
        label_ids = torch.tensor(self.label_ids, device=device)
        for chunk, b in self._eval_batches(batch_size, rank, world):
            b = {k: v.to(device) for k, v in b.items()}
            vocab_logits = self.label_word_logits(model, b, autocast)  # (B, V)
            target = torch.tensor([e.label for e in chunk], device=device)
            loss = F.cross_entropy(vocab_logits, label_ids[target], reduction="sum")
            correct = (vocab_logits[:, label_ids].argmax(1) == target).sum()
            stats += torch.tensor([float(loss), float(correct), len(chunk)], dtype=torch.float64)
        stats = _all_reduce(stats, world, device)
        return {"eval_loss": float(stats[0] / stats[2]), "eval_accuracy": float(stats[1] / stats[2])}


TASKS = {"lm": LMTask, "sft": SFTTask, "classification": ClassificationTask}


def build_task(cfg: DataConfig, tokenizer, eval_only: bool = False) -> Task:
    """The task ``data.task`` names; ``eval_only`` (slimtrain eval) reads only ``data.eval_files`` when set."""
    return TASKS[cfg.task](cfg, tokenizer, eval_only)


def format_metrics(metrics: dict) -> str:
    names = {"eval_loss": "eval loss", "eval_ppl": "perplexity", "eval_accuracy": "accuracy"}
    return ", ".join(f"{names.get(k, k)} {v:.4f}" for k, v in metrics.items())


__all__ = ["Task", "LMTask", "SFTTask", "ClassificationTask", "TASKS", "build_task", "load_rows", "format_metrics",
           "IGNORE"]
