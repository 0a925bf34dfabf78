"""Train the GPT on TinyStories, streamed, on characters or BPE tokens.

    python train.py                                      # the tinystories/ slice: the speedrun's recipe
    python train.py --dataset=roneneldan/TinyStories     # the full dataset, streamed from the hub

Every setting is a constant in config.py, overridden for one run as --key=value. A run resumes from the newest
checkpoint in OUT_DIR; Ctrl-C finishes the step, saves a checkpoint and exits, and the same command goes on
exactly. The file reads top to bottom: the pieces of a run, then the run (start or resume, the loop, the report).
"""

import bisect
import math
import os
import signal
import sys
import time
from contextlib import closing, contextmanager, nullcontext
from pathlib import Path

# Before torch loads OpenMP and MKL, which read these once. Left dynamic, they give a matrix product fewer threads
# when the machine is busy, and a sum split across fewer threads rounds differently: a run, or a resumed one, would
# not repeat bit for bit. Set, not defaulted: an inherited TRUE does that.
os.environ["OMP_DYNAMIC"] = "FALSE"
os.environ["MKL_DYNAMIC"] = "FALSE"

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import config
import data
import optim
from metrics import Metrics, plot_losses
from config import UserError
from device import autocast_for, compute_dtype, make_deterministic, matmul_rate, setup_distributed
from model import GPT, GPTConfig, grow_vocabulary, pair_index
from sample import continuations
from tokenizer import build_tokenizer, load_tokenizer

READS = ("data", "model", "training", "evaluation and progress", "checkpoints", "PROMPT", "TEMPERATURE", "TOP_K",
         "every command")  # for --help


def settings(argv):
    """config.py's settings with argv's overrides, checked and completed by config.check."""
    cfg = config.load(argv, __doc__, READS)
    config.check(cfg, argv, inherited=(*checkpoint.MODEL_KEYS, "tokenizer", "vocab_size"))  # INIT_FROM's shape
    return cfg


# ----------------------------------------------------------------------------- the pieces of a run

def learning_rate(step, steps, cfg):
    """The rate at step of a stage of steps steps (the run, without stages): linear warmup to LEARNING_RATE,
    then cosine decay to MIN_LR; with COOLDOWN, held until the stage's last COOLDOWN, then linear to MIN_LR."""
    if step < cfg["warmup_steps"]:
        return cfg["learning_rate"] * (step + 1) / cfg["warmup_steps"]
    if cfg["cooldown"]:
        left = min(1.0, (steps - step) / (cfg["cooldown"] * steps))  # 1 until the cooldown, then down to 0
        return cfg["min_lr"] + left * (cfg["learning_rate"] - cfg["min_lr"])
    progress = min(1.0, (step - cfg["warmup_steps"]) / max(1, steps - cfg["warmup_steps"]))
    return cfg["min_lr"] + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg["learning_rate"] - cfg["min_lr"])


def stage_starts(cfg):
    """The step each stage starts at: [0] without stages, [0, 30] for --stages=30,30."""
    return [sum(cfg["stages"][:i]) for i in range(len(cfg["stages"]))]


@torch.no_grad()
def evaluate(model, batches, counts, device, autocast):
    """(validation loss in nats per token, in bits per character), over every token of the validation text (of
    every rank's share, under torchrun). counts: the (tokens, characters) of batches' targets, counted once."""
    model.eval()
    total = torch.tensor([0.0, *counts], device=device)  # summed loss, tokens, characters
    for x, y in batches:
        with autocast:
            loss = model(x.to(device), y.to(device))[1].float()
        total[0] += loss * int((y != data.PAD).sum())  # the batch's mean loss back to its sum
    model.train()
    if dist.is_initialized():
        dist.all_reduce(total)
    return (total[0] / total[1]).item(), (total[0] / total[2]).item() / math.log(2)


def sample(model, prompt, tokenizer, cfg, step, metrics):
    """Print and log a short continuation of PROMPT (prompt: its ids) to watch a run learn, drawn with a generator of
    its own seeded by the step: the run's random numbers stay untouched, and a resumed run draws the unbroken one's."""
    model.eval()
    text = cfg["prompt"] + continuations(model, tokenizer, prompt, cfg["sample_chars"], cfg["temperature"],
                                         cfg["top_k"], cfg["seed"] + step)[0]
    model.train()
    print("sample: " + text.replace("\n", "\n        "))
    metrics.log(step=step, sample=text)


def format_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ----------------------------------------------------------------------------- the run

def main(argv):
    cfg = settings(argv)
    if cfg["deterministic"]:
        make_deterministic(cfg["device"])  # before setup_distributed, which starts CUDA
    rank, world_size, device = setup_distributed(cfg)
    try:
        # One run per OUT_DIR, or a second would remove or overwrite this one's checkpoints: rank 0 holds the lock
        # until the run ends. Evaluating only reads.
        with checkpoint.lock(Path(cfg["out_dir"])) if rank == 0 and not cfg["eval_only"] else nullcontext():
            run(cfg, rank, world_size, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(cfg, rank, world_size, device):
    """Start or resume, train to MAX_STEPS and report; with EVAL_ONLY, evaluate only. The steps keep the order
    of the random draws (the seed, the weights, the optimizer, the data), so that a run repeats exactly."""
    path, state, tokenizer, source, texts = start(cfg, world_size)
    model = make_model(cfg, rank, tokenizer, None if state or source else texts, device)
    val_batches, val_counts, held_out = validation(cfg, tokenizer, rank, world_size)
    autocast, unit, char_lengths = autocast_for(device), tokenizer.unit, torch.tensor(tokenizer.char_lengths)
    if cfg["eval_only"]:
        model.load_state_dict(state["model"])
        val_loss, val_bpc = evaluate(model, val_batches, val_counts, device, autocast)
        print(f"val_loss={val_loss:.4f} val_bpc={val_bpc:.4f} val_chars={val_counts[1]} val_tokens={val_counts[0]}")
        return
    optimizer = new_optimizer(model, cfg, device)
    batches = data.training_batches(cfg, tokenizer, held_out, rank, world_size)
    step = first_step = restore(cfg, rank, model, optimizer, batches, device, path, state, source)
    if step >= cfg["max_steps"]:
        print(f"already trained to step {step} of --max_steps={cfg['max_steps']}: raise --max_steps to train longer")
        return
    metrics = Metrics(Path(cfg["out_dir"]), step, cfg, state and state.get("wandb_id")) if rank == 0 else None
    accum, starts = cfg["grad_accum_steps"], stage_starts(cfg)
    chars_per_step = cfg["batch_size"] * cfg["block_size"] * accum * world_size
    print(f"model: {model.num_params():,} parameters, vocabulary {tokenizer.vocab_size} ({tokenizer.kind}), "
          f"device {device}; global batch {cfg['batch_size'] * accum * world_size} windows = {cfg['batch_size']} x "
          f"{world_size} rank{'s' * (world_size > 1)} x {accum} accumulation step{'s' * (accum > 1)}")
    train_model = torch.compile(model) if cfg["compile"] and device.type != "mps" else model
    if world_size > 1:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    prompt = tokenizer.encode(cfg["prompt"]) if cfg["sample_interval"] else None  # once: unknowns counted once
    started = log_time = time.time()
    log_step, train_time, val_loss, val_bpc, saved = step, 0.0, None, None, None
    with closing(metrics) if metrics else nullcontext(), closing(batches), stopping() as stop:
        while step < cfg["max_steps"]:
            stage = bisect.bisect_right(starts, step) - 1
            if step == starts[stage] and step > 0:  # same weights, fresh AdamW moments and a restarted schedule
                optimizer = new_optimizer(model, cfg, device)
                print(f"stage {stage + 1}/{len(starts)} begins at step {step}: fresh optimizer, schedule restarted")
            lr = learning_rate(step - starts[stage], cfg["stages"][stage], cfg)
            loss, bpc = train_step(train_model, optimizer, batches, lr, cfg, device, autocast, stop, step, char_lengths)
            step += 1
            if step % cfg["log_interval"] == 0 or step == cfg["max_steps"]:
                now = time.time()
                train_time += now - log_time
                rate = chars_per_step * (step - log_step) / (now - log_time)
                eta = train_time / (step - first_step) * (cfg["max_steps"] - step)
                staged = {"stage": stage + 1} if len(starts) > 1 else {}  # shown only when there are stages
                print(f"{f'stage {stage + 1}/{len(starts)} | ' if staged else ''}step {step}/{cfg['max_steps']} "
                      f"| loss {loss:.4f} | {bpc:.4f} bits/char | lr {lr:.2e} | {rate:,.0f} {unit}/s "
                      f"| {format_time(now - started)} elapsed | ETA {format_time(eta)}")
                if metrics:
                    metrics.log(step=step, **staged, loss=loss, bpc=bpc, lr=lr, tokens_per_sec=rate,
                                elapsed_s=now - started)
                log_step, log_time = step, time.time()
            paused = time.time()  # sampling and evaluation are not training time
            if cfg["sample_interval"] and step % cfg["sample_interval"] == 0 and rank == 0:
                sample(model, prompt, tokenizer, cfg, step, metrics)
            if step % cfg["eval_interval"] == 0 or step == cfg["max_steps"]:
                val_loss, val_bpc = evaluate(model, val_batches, val_counts, device, autocast)
                print(f"step {step}: val_loss {val_loss:.4f} nats/{unit} ({val_bpc:.4f} bits/char)")
                if metrics:
                    metrics.log(step=step, val_loss=val_loss, val_bpc=val_bpc, val_chars=val_counts[1],
                                val_tokens=val_counts[0])
            log_time += time.time() - paused
            if step % cfg["checkpoint_interval"] == 0 or step == cfg["max_steps"] or stop:
                state = checkpoint.capture(step, starts, model, optimizer, tokenizer, cfg, batches, device,
                                           metrics and metrics.wandb_id)
                if rank == 0:
                    saved = checkpoint.save(state, Path(cfg["out_dir"]), cfg["keep_checkpoints"])
            if stop:
                break
    if unknown := tokenizer.unknown_report():
        print(f"note: {unknown}")
    if stop:
        print(f"stopped at step {step}, saved {saved}; run the same command again to resume")
        return
    report(model, device, world_size, chars_per_step * (step - first_step) / train_time,
           f"{step - first_step} steps in {format_time(time.time() - started)}", val_loss, val_bpc, unit, saved)
    plot_losses(Path(cfg["out_dir"]), chars_per_step)


def start(cfg, world_size):
    """(path, state, tokenizer, source, texts): the checkpoint to resume or evaluate and its tokenizer; else the
    first training stories (texts), INIT_FROM's (path, state) if any (source), and a tokenizer for them: INIT_FROM's
    with the characters of texts it lacks added (BPE covers all), or a new one."""
    path, state = checkpoint.to_resume(cfg, world_size)
    if state:
        return path, state, load_tokenizer(state["tokenizer"]), None, None
    source = checkpoint.load_source(cfg) if cfg["init_from"] else None
    texts = data.vocabulary_stories(cfg["dataset"], cfg["tokenizer_stories"])
    if not source:
        return None, None, build_tokenizer(cfg["tokenizer"], texts, cfg["vocab_size"]), None, texts
    tokenizer = load_tokenizer(source[1]["tokenizer"])
    if tokenizer.kind == "bpe":
        print(f"vocabulary: the {tokenizer.vocab_size} BPE ids of {source[0]}, as byte-level BPE covers every text")
        return None, None, tokenizer, source, texts
    grown = tokenizer.grown(texts)
    added = grown.chars[len(tokenizer.chars):]
    print(f"vocabulary: {len(added)} characters of the data added to the {tokenizer.vocab_size} ids of {source[0]}"
          f"{f': {added!r}' if added else ''}")
    return None, None, grown, source, texts


def validation(cfg, tokenizer, rank, world_size):
    """(batches, the (tokens, characters) of their targets, the training stories held out to make them), described."""
    batches, held_out, about = data.validation_batches(cfg, tokenizer, rank, world_size)
    char_lengths = torch.tensor(tokenizer.char_lengths)
    counts = tuple(map(sum, zip(*(data.target_counts(y, char_lengths) for _, y in batches))))
    print(f"validation: {about}, {counts[1]:,} characters"
          f"{f' in {counts[0]:,} tokens' * (tokenizer.unit == 'token')}{' on this rank' * (world_size > 1)}")
    return batches, counts, held_out


def make_model(cfg, rank, tokenizer, texts, device):
    """The GPT cfg describes, on device; texts, in a fresh run, give their commonest pairs a bigram row each."""
    torch.manual_seed(cfg["seed"] + rank)  # DDP copies rank 0's weights; dropout differs per rank
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, dropout=cfg["dropout"],
                          **{key: cfg[key] for key in checkpoint.MODEL_KEYS}))
    if model.config.bigram and texts is not None:
        counts = data.pair_counts(texts, tokenizer, cfg["block_size"])
        model.pair_index.copy_(pair_index(tokenizer.vocab_size, cfg["bigram"], counts))
    return model.to(device)


def new_optimizer(model, cfg, device):
    return optim.optimizer(model, cfg["learning_rate"], cfg["weight_decay"], (cfg["beta1"], cfg["beta2"]),
                           device.type, cfg["muon"], cfg["adam_eps"])


def restore(cfg, rank, model, optimizer, batches, device, path, state, source):
    """The step to go on from: the checkpoint state's, restored into model, optimizer and batches; else 0, from
    INIT_FROM's weights (source) or random ones, with an earlier run's checkpoints in OUT_DIR removed."""
    if source:
        model.load_state_dict(grow_vocabulary(source[1]["model"], model))
        print(f"fine-tuning {source[0]}, trained {source[1]['step']} steps: its weights, a fresh optimizer "
              "and schedule")
    if state:
        step = checkpoint.restore(state, rank, model, optimizer, batches, device)
        print(f"resuming from {path} at step {step} (--resume=False starts afresh)")
        return step
    if checkpoint.paths(cfg["out_dir"]) and rank == 0:
        print(f"starting fresh: removing the checkpoints in {cfg['out_dir']}")
        for old in checkpoint.paths(cfg["out_dir"]):
            old.unlink()
    return 0


@contextmanager
def stopping():
    """The signal that asked the run to stop, once one has: the first SIGINT or SIGTERM lets the step finish and be
    saved, a second quits at once. Their handlers are put back on leaving."""
    stop = []

    def on_signal(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
        print("\nstopping after this step to save a checkpoint (Ctrl-C again quits at once)", file=sys.stderr)

    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def train_step(train_model, optimizer, batches, lr, cfg, device, autocast, stop, step, char_lengths):
    """One optimizer step at rate lr over GRAD_ACCUM_STEPS micro-batches: the mean loss, in nats per token and
    bits per character. A loss that is not finite stops the run before the update: no bad weights are saved."""
    for group in optimizer.param_groups:  # read from cfg, not the group: a resume may change it
        group["lr"] = lr * (cfg["bigram_lr"] if group.get("name") == "bigram" else 1)
    accum, distributed = cfg["grad_accum_steps"], dist.is_initialized()
    loss, counts = 0.0, [0, 0]  # tokens, characters
    for micro in range(accum):
        x, y = next(batches)
        counts = [a + b for a, b in zip(counts, data.target_counts(y, char_lengths))]
        if distributed:  # average the gradients across ranks once, after the last micro-batch
            train_model.require_backward_grad_sync = micro == accum - 1
        with autocast:
            _, micro_loss = train_model(x.to(device), y.to(device))
        (micro_loss / accum).backward()
        loss += micro_loss.detach() / accum
    diverged = ~torch.isfinite(loss)
    if distributed:  # every rank must stop at the same step, whichever saw the signal or the NaN
        flags = torch.stack([torch.tensor(float(bool(stop)), device=device), diverged.float()])
        dist.all_reduce(flags)
        if flags[0] > 0 and not stop:
            stop.append(signal.SIGTERM)
        diverged = flags[1] > 0
    if diverged:
        newest = checkpoint.paths(cfg["out_dir"])[0] if checkpoint.paths(cfg["out_dir"]) else "none yet"
        raise UserError(f"the loss became {loss.item()} at step {step + 1}, so training stopped; the last "
                        f"good checkpoint is {newest}. Lower --learning_rate (now {cfg['learning_rate']}) "
                        "and run again to resume from it")
    if cfg["grad_clip"] > 0:
        torch.nn.utils.clip_grad_norm_(train_model.parameters(), cfg["grad_clip"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), loss.item() / math.log(2) * (counts[0] / counts[1])


def report(model, device, world_size, rate, steps, val_loss, val_bpc, unit, saved):
    """The final lines: the ranks' weights compared (DDP should never let them drift apart), speed, validation loss,
    and MFU against the measured matrix-product rate."""
    if world_size > 1:
        weights = torch.cat([p.detach().float().flatten() for p in model.parameters()])
        lowest, highest = weights.clone(), weights.clone()
        dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
        dist.all_reduce(highest, op=dist.ReduceOp.MAX)
        if not torch.equal(lowest, highest):
            raise RuntimeError("the ranks' weights differ after training")
        print(f"weights identical on all {world_size} ranks")
    print(f"done: {steps}, {rate:,.0f} {unit}/s in training; "
          f"val_loss {val_loss:.4f} nats/{unit} ({val_bpc:.4f} bits/char); saved {saved}")
    flops, dtype = model.flops_per_char(), compute_dtype(device)  # the rate of the dtype it computed in
    peak = matmul_rate(device, dtype)
    print(f"model: {flops / 1e6:.2f} MFLOP per {unit}; MFU {rate * flops / peak / world_size:.0%} of "
          f"{'each process' if world_size > 1 else 'this machine'}'s {peak / 1e9:,.0f} GFLOP/s "
          f"{str(dtype).removeprefix('torch.')} matrix-product rate")


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # progress lines reach a pipe (tee, a log, a test) as printed
    config.command(main)
