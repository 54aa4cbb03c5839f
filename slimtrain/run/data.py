"""Text -> token blocks: local files (or the built-in corpus) through ``datasets``, tokenized,
joined with <eos>, packed into fixed blocks and split into train / held-out eval blocks.

The order of training blocks is a pure function of ``(seed, position)``: position ``i`` of the
run's sample stream is block ``perm(seed, i // n)[i % n]``. So the data position in a
checkpoint is a single integer and resume needs no iterator state.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import torch

from .config import DataConfig


class DataError(ValueError):
    """Unusable data (missing file, too little text); the message names the fix."""


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 plus <eos>=256: needs no download and no vocabulary file."""

    eos_token_id = 256
    bos_token_id = None
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A local Hugging Face tokenizer directory (``AutoTokenizer``, or the tokenizer inside a GGUF
    file), without special tokens added per document: documents are joined with ``eos_token_id``
    by the packer."""

    def __init__(self, path: str, gguf_file: str = ""):
        from transformers import AutoTokenizer

        if not os.path.isdir(path):
            raise DataError(f"data.tokenizer={path!r} is neither 'byte' nor an existing tokenizer directory")
        self.tok = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
        eos = self.tok.eos_token_id if self.tok.eos_token_id is not None else self.tok.sep_token_id
        if eos is None:
            raise DataError(f"data.tokenizer={path!r} has no eos_token (needed to separate packed documents)")
        self.eos_token_id = eos
        self.bos_token_id = self.tok.bos_token_id
        self.pad_token_id = self.tok.pad_token_id
        self.vocab_size = len(self.tok)
        self.has_chat_template = bool(getattr(self.tok, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tok.decode(ids)

    def chat_prompt(self, messages: list[dict]) -> str:
        """The chat template's rendering of ``messages`` up to the assistant's turn."""
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def save_pretrained(self, path: str) -> None:
        self.tok.save_pretrained(path)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def model_has_tokenizer(model_cfg) -> bool:
    path = model_cfg.name
    return bool(model_cfg.gguf_file) or (os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, n)) for n in _TOKENIZER_FILES))


def build_tokenizer(cfg: DataConfig, model_cfg=None):
    """``data.tokenizer``: 'byte', a directory, or 'auto' (the model's own tokenizer when
    ``model_cfg`` names a directory holding one or a GGUF file, else 'byte')."""
    if cfg.tokenizer == "auto":
        if model_cfg is not None and model_has_tokenizer(model_cfg):
            return HFTokenizer(model_cfg.name, model_cfg.gguf_file)
        return ByteTokenizer()
    return ByteTokenizer() if cfg.tokenizer == "byte" else HFTokenizer(cfg.tokenizer)


# ---------------------------------------------------------------------------- documents
_FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def builtin_corpus() -> list[str]:
    """~465 KB of real English: Python's own documentation topics, shipped with every Python."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def resolve_files(patterns: list[str]) -> list[str]:
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise DataError(f"data.files: {pattern!r} matches no file (working directory {os.getcwd()!r})")
        files += matches
    for f in files:
        if os.path.isdir(f):
            raise DataError(f"data.files: {f!r} is a directory; list its files (e.g. {f}/*.txt)")
    return files


def check_file(path: str, fmt: str) -> None:
    """Fail with one line naming ``path`` (and the line) when it is empty, not UTF-8 text, or
    (json) not one JSON value per line / one JSON document: ``datasets`` would only say
    ``DatasetGenerationError``."""
    if fmt == "parquet":
        return
    if os.path.getsize(path) == 0:
        raise DataError(f"data.files: {path!r} is empty")
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data.files: {path!r} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 4]!r}); "
                        "is it a binary file?") from None
    if "\x00" in text:
        raise DataError(f"data.files: {path!r} contains NUL bytes; is it a binary file?")
    if fmt != "json":
        return
    import json

    if text.lstrip().startswith("["):  # one JSON document holding a list of rows
        try:
            json.loads(text)
        except ValueError as e:
            raise DataError(f"data.files: {path!r} is not valid JSON ({e})") from None
        return
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"data.files: {path!r} line {n} is not valid JSON ({e}); expected one JSON object "
                                "per line") from None
            if not isinstance(row, dict):
                raise DataError(f"data.files: {path!r} line {n} is {type(row).__name__} {row!r}, not a JSON object "
                                '(e.g. {"text": "..."})')


def load_documents(cfg: DataConfig):
    """A ``datasets.Dataset`` with one column ``text``."""
    import datasets

    datasets.disable_progress_bars()
    if not cfg.files:
        return datasets.Dataset.from_dict({"text": builtin_corpus()})
    files = resolve_files(cfg.files)
    fmt = cfg.format
    if fmt == "auto":
        ext = os.path.splitext(files[0])[1].lower()
        if ext not in _FORMATS:
            raise DataError(f"data.files: cannot tell the format of {files[0]!r} from {ext!r}; set data.format to "
                            f"one of ['text', 'json', 'parquet']")
        fmt = _FORMATS[ext]
    for f in files:
        check_file(f, fmt)
    try:
        ds = datasets.load_dataset(fmt, data_files=files, split="train", keep_in_memory=True)
    except Exception as e:  # a malformed file: name the files and the format we tried
        raise DataError(f"data.files={files!r} could not be read as {fmt!r}: {type(e).__name__}: {e}") from e
    if cfg.text_field not in ds.column_names:
        raise DataError(f"data.text_field={cfg.text_field!r} is not a column of {files!r}; columns: {ds.column_names}")
    feature = ds.features[cfg.text_field]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        bad = next((i for i, t in enumerate(ds[cfg.text_field]) if t is not None and not isinstance(t, str)), 0)
        raise DataError(f"data.text_field={cfg.text_field!r} in {files!r} holds {feature} values, not text (row {bad} "
                        f"is {ds[bad][cfg.text_field]!r}); every row needs a string")
    return ds.select_columns([cfg.text_field]).rename_column(cfg.text_field, "text") if cfg.text_field != "text" else ds


# ---------------------------------------------------------------------------- packing
@dataclass
class PackedData:
    train: torch.Tensor  # (N_train, seq_len) token ids
    eval: torch.Tensor  # (N_eval, seq_len)
    tokens: int  # total tokens after tokenization
    # Source-document id (index into the document list) of each training block's first token:
    # federated partitioning skews clients over documents when the text has no labels.
    train_docs: torch.Tensor | None = None  # (N_train,) int64


def pack(cfg: DataConfig, tokenizer) -> PackedData:
    """Tokenize, join documents with <eos>, cut into ``seq_len`` blocks, hold out every k-th block."""
    docs = load_documents(cfg)
    eos = tokenizer.eos_token_id

    def encode(batch):
        return {"ids": [tokenizer.encode(t) + [eos] for t in batch["text"] if t and t.strip()]}

    encoded = docs.map(encode, batched=True, remove_columns=docs.column_names, keep_in_memory=True)
    ids = encoded["ids"] if "ids" in encoded.column_names else []  # no column when every row was blank
    stream = torch.tensor([i for doc in ids for i in doc], dtype=torch.long)
    n_blocks = len(stream) // cfg.seq_len
    where = ", ".join(cfg.files) if cfg.files else "the built-in corpus"
    if n_blocks < 2:
        raise DataError(
            f"{where} gives {len(stream)} tokens after tokenization, fewer than 2 * data.seq_len = {2 * cfg.seq_len} "
            "(one training and one eval block); add text or lower data.seq_len"
        )
    blocks = stream[: n_blocks * cfg.seq_len].view(n_blocks, cfg.seq_len)  # (N, T)
    # Interleaved hold-out (every k-th block) spreads eval text over the whole corpus.
    k = max(2, round(1.0 / cfg.eval_fraction))
    is_eval = torch.arange(n_blocks) % k == k - 1
    if not is_eval.any():
        is_eval[-1] = True
    doc_ends = torch.tensor([len(doc) for doc in ids], dtype=torch.long).cumsum(0)
    block_docs = torch.searchsorted(doc_ends, torch.arange(n_blocks) * cfg.seq_len, right=True)  # (N,)
    return PackedData(train=blocks[~is_eval], eval=blocks[is_eval][: cfg.max_eval_blocks], tokens=len(stream),
                      train_docs=block_docs[~is_eval])


class BlockOrder:
    """Position ``i`` of the sample stream -> training block id, reshuffled each epoch from the seed."""

    def __init__(self, n_blocks: int, seed: int):
        self.n, self.seed = n_blocks, seed
        self._epoch, self._perm = -1, None

    def _perm_of(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def blocks(self, start: int, count: int) -> torch.Tensor:
        return torch.stack([self._perm_of(i // self.n)[i % self.n] for i in range(start, start + count)])
