"""Shared test utilities: a tiny Llama, real text batches, and a real multi-process runner."""

from __future__ import annotations

import os
import pathlib
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny_llama(seed: int = 0, vocab: int = 256, hidden: int = 64, layers: int = 2, dtype=torch.float32):
    """A 2-layer Llama built from a config (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 5 // 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).to(dtype)


def text_bytes() -> torch.Tensor:
    """tiny-shakespeare as byte ids (real English text) from ../shared/data."""
    path = SHARED_DATA / "tinyshakespeare.txt"
    return torch.frombuffer(bytearray(path.read_bytes()[:200_000]), dtype=torch.uint8).long()


def text_batches(n: int, batch: int = 4, seq: int = 32, seed: int = 0):
    """``n`` batches of (batch, seq) byte ids sampled from real text."""
    data = text_bytes()
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        idx = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        out.append(torch.stack([data[i : i + seq] for i in idx]))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, os.path.join(result_dir, f"{rank}.pt"))
    except BaseException:  # report the traceback to the parent test
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args):
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` real processes joined by gloo.

    ``fn`` must be a module-level function; its return value (tensors, numbers, lists) comes
    back per rank. A failure on any rank raises here with that rank's traceback.
    """
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(world_size, free_port(), fn, args, d), nprocs=world_size,
                           join=True, start_method="spawn")
        results = []
        for r in range(world_size):
            out = torch.load(os.path.join(d, f"{r}.pt"), weights_only=False)
            if not out["ok"]:
                raise AssertionError(f"rank {r} failed:\n{out['error']}")
            results.append(out["result"])
        return results
