"""What a checkpoint is: a torch.save'd dict of plain values and tensors (torch.load(weights_only=True) reads it
without pickled code) holding all a run needs to go on exactly, with a checksum, as torch.load misses a damaged
tensor. Written atomically, read back checked, older formats converted; and which one a run goes on from."""

import bisect
import errno
import hashlib
import os
import random
import re
import sys
from dataclasses import asdict, fields
from pathlib import Path

import filelock
import torch
import torch.distributed as dist

from config import UserError
from model import GPTConfig, pair_index

FORMAT = 2  # raised whenever the layout of a checkpoint changes; load converts the older ones
PATTERN = "ckpt_*.pt"
LOCK = "train.lock"  # in OUT_DIR: held by the run training there, and holds its process id from byte 1 on
# What to do about a checkpoint that could not be written, by error number: only a full disk wants space freed.
FIXES = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space within the disk quota",
         errno.EACCES: "make {} writable", errno.EPERM: "make {} writable", errno.EROFS: "make {} writable",
         errno.ENOENT: "{} was moved or deleted during the run: put it back"}
# The model's shape: GPTConfig's fields but those that come from the tokenizer or only act in training.
# config.py has a setting of each name; a checkpoint must share them with the config to be resumed.
MODEL_KEYS = tuple(f.name for f in fields(GPTConfig) if f.name not in ("vocab_size", "dropout"))


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


def capture(step, starts, model, optimizer, tokenizer, cfg, batches, device, wandb_id=None):
    """All a run (its stages starting at the steps in starts, its W&B run wandb_id) needs to go on exactly after
    step steps. Every rank calls it: it gathers each rank's data stream and RNGs, in rank order."""
    stage = bisect.bisect_left(starts, step) - 1  # the stage of the last step taken
    mine = {"data": batches.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "mps": torch.mps.get_rng_state() if device.type == "mps" else None}}
    ranks = [mine]
    if dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    return {"format": FORMAT, "step": step, "stage": stage + 1, "stage_step": step - starts[stage],
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "model_args": asdict(model.config),
            "config": cfg, "tokenizer": tokenizer.state_dict(), "world_size": len(ranks),
            "data": [r["data"] for r in ranks], "rng": [r["rng"] for r in ranks], "wandb_id": wandb_id,
            "threads": torch.get_num_threads()}  # a product splits its sum by them: on the CPU the numbers do too


def restore(state, rank, model, optimizer, batches, device):
    """Put model, optimizer, this rank's data stream and RNGs back as capture found them; the step."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    batches.load_state_dict(state["data"][rank])
    rng = state["rng"][rank]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
    if rng.get("mps") is not None and device.type == "mps":  # older checkpoints have no "mps"
        torch.mps.set_rng_state(rng["mps"])
    threads = state.get("threads", torch.get_num_threads())  # older checkpoints do not say
    if device.type == "cpu" and threads != torch.get_num_threads():
        print(f"note: the checkpoint was written on {threads} CPU thread{'s' * (threads > 1)}, this run has "
              f"{torch.get_num_threads()}: it goes on, but not bit for bit as it would with OMP_NUM_THREADS={threads}",
              file=sys.stderr)
    return state["step"]


def save(state, out_dir, keep):
    """Write state as out_dir/ckpt_<step>.pt, keeping the newest keep. Written beside its name, flushed and renamed:
    a crash leaves the old set or the new one, never half a file under a checkpoint's name."""
    out_dir = Path(out_dir)
    path = out_dir / f"ckpt_{state['step']:08d}.pt"
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({**state, "checksum": checksum(state)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if os.name != "nt":  # make the rename itself durable (Windows cannot open a folder to flush it)
            folder = os.open(out_dir, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        found, fix = paths(out_dir), FIXES.get(e.errno, "fix that").format(out_dir)
        then = f" to resume from {found[0]}, which is intact" if found else " again"
        raise UserError(f"could not write {path} ({e.strerror or e}): {fix}, then run the same command{then}") from e
    for old in paths(out_dir)[keep:] + list(out_dir.glob("ckpt_*.tmp")):  # and leftovers of a killed run
        old.unlink()
    return path


def load(path):
    """The checkpoint at path, checked and in this code's format; UserError if it cannot be used, saying why."""
    if not Path(path).is_file():
        raise UserError(f"no checkpoint file {path}: check the path, or leave --checkpoint out to take the "
                        "newest in --out_dir")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} cannot be read as a checkpoint ({type(e).__name__}): it is another kind of file, "
                        "or truncated or corrupt") from e
    found = state.get("format") if isinstance(state, dict) else None
    if found not in (1, FORMAT):
        raise UserError(f"checkpoint {path} has format {found}, this code reads formats 1 to {FORMAT}: "
                        "use the version of the code that wrote it, or train anew")
    if "checksum" not in state:
        raise UserError(f"checkpoint {path} has no checksum: an earlier version of this code wrote it; "
                        "train anew, or sample from it with that version")
    if state.pop("checksum") != checksum(state):
        raise UserError(f"checkpoint {path} is corrupt: its contents do not match their checksum")
    if found == 1:  # token shift's shares were named shift_1, shift_2, shift_1_back2, ... (same order)
        state["model"] = {share_name(name): w for name, w in state["model"].items()}
        state["format"] = FORMAT
    weights, args = state["model"], state["model_args"]
    if "bigram.weight" in weights and "pair_index" not in weights:  # written when every pair's row was hashed
        weights["pair_index"] = pair_index(len(weights["transformer.wte.weight"]), len(weights["bigram.weight"]))
    if args.get("swiglu") and weights["transformer.h.0.mlp.c_proj.weight"].size(1) != args.get("mlp_hidden"):
        args["mlp_hidden"] = 0  # written when SwiGLU was 8/3 n_embd wide whatever mlp_hidden said
    return state


def share_name(name):
    """A format 1 weight's name now: token shift's shares numbered in the order they were registered in."""
    shift = re.fullmatch(r"(.*)shift(?:_([12]))?(?:_back(\d+))?", name)
    if not shift:
        return name
    sites, site, back = (2, int(shift[2]), int(shift[3] or 1)) if shift[2] else (1, 1, int(shift[3] or 1))
    return f"{shift[1]}shift.{(back - 1) * sites + site - 1}"


def export(path, dest):
    """Copy the checkpoint at path to dest for sampling and evaluation only: without optimizer, data and RNGs."""
    state = load(path)
    kept = {key: state[key] for key in ("format", "step", "model", "model_args", "config", "tokenizer")}
    torch.save({**kept, "checksum": checksum(kept)}, dest)


def load_newest(out_dir):
    """(path, state) of the newest intact checkpoint in out_dir (a damaged one is reported), or None if none."""
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


def lock(out_dir):
    """Claim out_dir for this training run, or refuse, naming the run that holds it: the open lock file. An OS lock,
    it holds until the file is closed or the process ends, however it ends: a killed run leaves none behind."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        f = open(out_dir / LOCK, "a+")  # not "w": that would erase the holder's process id
        if not os.access(out_dir, os.W_OK):  # the lock file may be an earlier run's: the folder itself
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as e:
        raise UserError(f"cannot write to --out_dir={out_dir} ({e.strerror or e}): choose a writable folder") from e
    if not filelock.lock_descriptor(f.fileno(), blocking=False):
        f.seek(1)  # Windows's lock is on byte 0, which no other process may then read
        holder = f.read().strip() or "unknown"
        f.close()
        raise UserError(f"--out_dir={out_dir} is in use by another training run (process {holder}): wait for it "
                        "to finish or stop it, or pass --out_dir=<another folder>")
    f.truncate(0)
    f.write(f"\n{os.getpid()}\n")
    f.flush()
    return f


def to_resume(cfg, world_size):
    """(path, state) of the checkpoint a run goes on from, or (None, None) for a fresh one: with EVAL_ONLY,
    CHECKPOINT or else the newest intact one in OUT_DIR, evaluated as it is whatever shape cfg gives; with RESUME,
    the newest, refused, saying what differs, where these settings cannot continue it exactly."""
    out_dir = Path(cfg["out_dir"])
    if cfg["eval_only"] and cfg["checkpoint"]:
        path, state = cfg["checkpoint"], load(cfg["checkpoint"])
    else:
        path, state = (load_newest(out_dir) if cfg["resume"] or cfg["eval_only"] else None) or (None, None)
    if cfg["eval_only"]:
        if not state:
            raise UserError(f"no checkpoint to evaluate in {out_dir}: train one with python train.py first")
        cfg.update(model_settings(state))  # a checkpoint is evaluated as it is, whatever shape cfg gives
        return path, state
    if not state:
        return None, None
    if cfg["init_from"]:  # only a run started from the same INIT_FROM goes on
        started_from = state["config"].get("init_from")
        if not started_from or Path(started_from).resolve() != Path(cfg["init_from"]).resolve():
            raise UserError(f"{path} is a run of its own, and --init_from={cfg['init_from']} asks for a new one: "
                            f"pass --resume=False to start afresh from {cfg['init_from']} (removing the checkpoints "
                            f"in {out_dir}), or drop --init_from to resume {path}")
        inherit(cfg, state, path)
    for key, saved in model_settings(state).items():
        if saved != cfg[key]:
            raise UserError(f"{path} holds a model with {key}={saved}, the config asks for {key}={cfg[key]}: pass "
                            f"--{key}={saved} to resume it, or --out_dir=<new folder> to train a new model")
    if state["world_size"] != world_size:
        raise UserError(f"{path} was written by a run of {state['world_size']} processes, this one has "
                        f"{world_size}: resume it with as many (torchrun --nproc_per_node={state['world_size']}"
                        f"{' ...' if state['world_size'] > 1 else ' or plain python'}) so every data stream goes on")
    if state["config"].get("muon", False) != cfg["muon"]:  # the optimizer's state would not fit
        raise UserError(f"{path} was trained with --muon={state['config'].get('muon', False)}: pass that to resume "
                        "it, or --out_dir=<new folder>")
    saved = tokenizer_args(state["tokenizer"].get("kind", "char"), state["config"].get("vocab_size"))  # older: no kind
    asked = tokenizer_args(cfg["tokenizer"], cfg["vocab_size"])
    if saved != asked:
        raise UserError(f"{path} was trained with {saved}, the config asks for {asked}: pass {saved} to resume it, "
                        "or --out_dir=<new folder> to train anew (a tokenizer is never retrained on resume)")
    if state["config"]["dataset"] != cfg["dataset"]:
        raise UserError(f"{path} was trained on {state['config']['dataset']!r}, not {cfg['dataset']!r}: pass "
                        f"--dataset={state['config']['dataset']} to resume it, or --out_dir=<new folder>")
    return path, state


def load_source(cfg):
    """(path, state) of INIT_FROM, a file or a run folder's newest checkpoint, whose shape and tokenizer cfg takes."""
    path = cfg["init_from"]
    if Path(path).is_file():
        found = path, load(path)
    elif not Path(path).is_dir():
        raise UserError(f"--init_from={path} is neither a checkpoint file nor a run folder: check the path")
    else:
        try:
            found = load_newest(path)
        except UserError:
            raise UserError(f"--init_from={path} holds no intact checkpoint: name another file or folder") from None
        if not found:
            raise UserError(f"--init_from={path} is a folder without checkpoints: name a checkpoint file, or a "
                            "run's --out_dir")
    inherit(cfg, found[1], found[0])
    return found


def model_settings(state):
    """The MODEL_KEYS settings of the model in state: a checkpoint older than a setting has its default."""
    return {key: state["model_args"].get(key, getattr(GPTConfig, key)) for key in MODEL_KEYS}


def inherit(cfg, state, path):
    """Fill in the shape and tokenizer settings that cfg leaves (None) to the checkpoint state at path, which a
    fine-tuning run starts from or continues; refuse one given that differs."""
    kind = state["tokenizer"].get("kind", "char")
    saved = {**model_settings(state), "tokenizer": kind, "vocab_size": state["config"].get("vocab_size")}
    for key, value in saved.items():
        if cfg[key] is None or (key == "vocab_size" and kind == "char"):  # VOCAB_SIZE counts only for BPE
            cfg[key] = value
        elif cfg[key] != value:
            why = ("byte-level BPE covers every text already, so its vocabulary does not grow" if key == "vocab_size"
                   else "a fine-tuned model keeps the shape and tokenizer of the one it starts from")
            raise UserError(f"--{key}={cfg[key]} disagrees with {key}={value} of {path}: {why}; leave --{key} out")


def tokenizer_args(kind, vocab_size):
    """The settings that make a tokenizer, as given on the command line: VOCAB_SIZE counts only for BPE."""
    return f"--tokenizer=bpe --vocab_size={vocab_size}" if kind == "bpe" else f"--tokenizer={kind}"


if __name__ == "__main__":  # python checkpoint.py SOURCE DEST: how pretrained/ was made (see its README)
    export(*sys.argv[1:3])
