"""Checkpoints on disk: written atomically, checksummed, the newest few kept, loaded without
pickled code.

A checkpoint is one torch.save'd dict of tensors, numbers, strings, lists and dicts, so
torch.load(weights_only=True) can read it. Its keys: format, step, model, optimizer,
model_args, config, tokenizer, data, rng and the rest (see train.py's checkpoint_state), and a
checksum of all of them: torch.load alone does not notice a damaged byte inside a tensor.
"""

import hashlib
import os
import sys
from pathlib import Path

import torch

from config import UserError

FORMAT = 1  # raised whenever the layout of a checkpoint changes
PATTERN = "ckpt_*.pt"


def paths(out_dir):
    """The checkpoint files in out_dir, newest (highest step) first."""
    return sorted(Path(out_dir).glob(PATTERN), reverse=True)


def checksum(obj, h=None):
    """SHA-256 over every tensor's bytes and every other value's repr, in order."""
    h = h or hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        h.update(f"{obj.dtype}{tuple(obj.shape)}".encode())
        h.update(obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        for key, value in obj.items():
            h.update(repr(key).encode())
            checksum(value, h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}{len(obj)}".encode())
        for value in obj:
            checksum(value, h)
    else:
        h.update(repr(obj).encode())
    return h.hexdigest()


def save(state, out_dir, keep):
    """Write state as out_dir/ckpt_<step>.pt, then delete all but the newest keep checkpoints.

    The file is written beside its final name, flushed to disk and renamed, so a crash at any
    moment leaves either the old set of checkpoints or the new one, never a half-written file
    under a checkpoint's name. A failed write (a full disk) leaves the old set as it was.
    """
    out_dir = Path(out_dir)
    path = out_dir / f"ckpt_{state['step']:08d}.pt"
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({**state, "checksum": checksum(state)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(out_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        previous = paths(out_dir)[0] if paths(out_dir) else "none"
        raise UserError(f"could not write {path} ({e.strerror or e}); the previous checkpoint ({previous}) is "
                        "intact: free some space, then run again to resume from it") from e
    for old in paths(out_dir)[keep:] + list(out_dir.glob("ckpt_*.tmp")):  # and leftovers of a killed run
        old.unlink()
    return path


def load(path):
    """The checkpoint at path, checked; UserError if it cannot be used, saying why."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}): it is truncated or corrupt") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        raise UserError(f"checkpoint {path} has format {found}, this code reads format {FORMAT}: "
                        "use the version of the code that wrote it, or train anew")
    if "checksum" not in state:
        raise UserError(f"checkpoint {path} has no checksum: an earlier version of this code wrote it; "
                        "train anew, or sample from it with that version")
    if state.pop("checksum") != checksum(state):
        raise UserError(f"checkpoint {path} is corrupt: its contents do not match their checksum")
    return state


def load_newest(out_dir):
    """(path, state) of the newest intact checkpoint in out_dir, or None if there is none.

    A damaged one is reported and the one before it is tried; if none is intact, that is an
    error."""
    found = paths(out_dir)
    for path in found:
        try:
            return path, load(path)
        except UserError as e:
            print(f"warning: {e}; trying the one before it", file=sys.stderr)
    if found:
        raise UserError(f"no intact checkpoint in {out_dir}: start a fresh run with --resume=False "
                        "(or --out_dir=<new folder>)")
    return None
