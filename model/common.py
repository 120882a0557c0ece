"""
Small pieces every other file needs: the one error type users see, a one-line argparse error, atomic
writes, JSONL reading, device/dtype selection and autocast, and how a duration is printed.
"""

import argparse
import io
import json
import os
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch

from model import dist


class UserError(Exception):
    """Bad input from the user (a missing file, a malformed line, a mismatched checkpoint). The scripts
    print it as one line and exit 1, with no traceback."""


def run_main(main):
    """Run a script's main(), turning a UserError or Ctrl-C into a one-line message and a non-zero exit.
    Under torchrun the ranks then leave the job together: after a barrier (the others wait there while rank 0
    writes the report), or, after an error, at once (a rank that exits with an error makes torchrun stop
    the others, so no rank waits for it forever)."""
    try:
        main()
        dist.barrier()
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted (checkpoints and data files are written atomically; nothing half-written)")
    finally:
        dist.cleanup()


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line (no usage block) naming the flag, and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def atomic_write_bytes(path, data: bytes):
    """Write to a temporary file in the same folder, then rename over path: a killed run leaves either
    the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_torch_save(obj, path):
    """torch.save, written atomically (see atomic_write_bytes)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_jsonl(path) -> list[tuple[int, dict]]:
    """(line number, object) for each line of a JSONL file. An empty or malformed line is a UserError
    naming the file and the line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                raise UserError(f"{path}:{i}: empty line (JSONL needs one JSON object per line)")
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{i}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
            rows.append((i, obj))
    return rows


def pick_device(name: str) -> str:
    """'auto' picks cuda, then mps, then cpu; an explicit device that isn't there is a UserError."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available")
    return name


# On a CPU with native bf16 matmuls, bf16 autocast pays from this model width on (docs/performance.md, the
# crossover table: a CE step is 0.93-0.98x fp32's tokens/s at n_embd 96 and 1.1-1.4x at 128; a KD step, whose
# teacher is twice as wide, already wins at 64). Below it, casting the weights and activations costs more than
# the faster matmuls save.
CPU_BF16_MIN_WIDTH = 128


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU multiplies bf16 itself. Without them (e.g. AVX2 only) oneDNN emulates bf16
    matmuls, measured ~100x slower than fp32. torch.cpu's probes are private, so a torch without them
    counts as no."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def pick_dtype(name: str, device: str, n_embd: int) -> str:
    """'auto' is bf16 on CUDA with bf16 support; on a CPU with native bf16 (cpu_has_native_bf16) when the
    trained model's width n_embd is at least CPU_BF16_MIN_WIDTH; else fp32. An explicit name is kept."""
    if name != "auto":
        return name
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device == "cpu" and cpu_has_native_bf16() and n_embd >= CPU_BF16_MIN_WIDTH:
        return "bf16"
    return "fp32"


def autocast(device: str, dtype: str):
    """The autocast context for a dtype name: bf16/fp16 autocast, or nothing for fp32."""
    if dtype == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0],
                          dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])


def compiled(model, on: bool):
    """torch.compile(model) if on, else the model itself. The compiled wrapper shares the model's weights, so
    training, checkpoints and evaluation keep using the plain module."""
    return torch.compile(model) if on else model


def format_time(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
