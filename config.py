"""Every setting of train.py, sample.py and bench.py, as a commented constant. Edit this file, or
override any constant for one run from the command line, in lower case:

    python train.py --max_steps=500 --dataset=roneneldan/TinyStories
    python sample.py --greedy --prompt "Once upon a time"
    python train.py --help      # the settings a command reads, from this file's own comments
"""

import difflib
import os
import re
import sys
import textwrap
from pathlib import Path

# --- data ---
# the slice in tinystories/; a hub dataset (roneneldan/TinyStories), a folder in the hub's layout, or a
# .txt/.jsonl/.parquet file
DATASET = "tinystories"
TOKENIZER = "char"  # char: one id per character; bpe: byte-level BPE of VOCAB_SIZE ids (see tokenizer.py)
VOCAB_SIZE = 512  # ids of the BPE tokenizer (bpe only; at least 257: every byte and the end of a story)
TOKENIZER_STORIES = 10_000  # the vocabulary is built from this many first training stories, up to 16M characters
HOLDOUT_EVERY = 20  # with no validation split, every this-many-th training story is held out to validate on
SHUFFLE = 10_000  # training reads the stories this many at a time, each run of them in a new random order every pass; 0: in order

# --- model ---
BLOCK_SIZE = 256  # tokens of context (characters, with the char tokenizer); rotary positions cost no parameters
N_LAYER = 1  # transformer blocks
N_HEAD = 8  # attention heads per block (n_embd / n_head channels each)
N_EMBD = 128  # width of the residual stream
DROPOUT = 0.0  # dropout probability in training
ROPE = True  # rotary position embeddings in attention instead of learned ones (wpe, whose parameters the recipe spends on MLP_HIDDEN)
ROPE_HALF = True  # rotary: half of each head's channel pairs not turned, the other half at 1 to 1/1024 radians a position
ROPE_UNTURNED_FIRST = True  # ROPE_HALF's unturned half: each head's first half of channels (KEY_OFFSET's), the second turned in pairs of its own
SWIGLU = True  # SwiGLU MLP instead of GELU: gate and value MLP_HIDDEN wide (0: 8/3 * N_EMBD, GELU's parameters at 4 * N_EMBD)
TIE_WEIGHTS = False  # the output head shares the token embedding's weights
TOKEN_SHIFT = True  # add to each position a learned share (per channel) of the previous one's embedding and sublayer inputs
SHIFT_REACH = 2  # token shift's reach: the shares of this many positions before each one (1: the previous one only)
MLP_HIDDEN = 217  # hidden width of the MLP; 0: 4 * N_EMBD (SwiGLU: 8/3 * N_EMBD). Narrow, to leave BIGRAM room in the speedrun's cap
BIGRAM = 512  # rows of a learned table of (previous, current) character pairs added to the input, one per common pair; 0: none
KEY_OFFSET = True  # attention's keys take the first half of each head's channels from the position before
ATTN_GATE = True  # each head's output scaled by a sigmoid of a learned projection (n_embd -> n_head) of attention's input
SHIFT_GATE = True  # at each position, token shift's shares scaled by 2 sigmoid of a learned projection (n_embd -> 1) of the input

# --- training ---
MAX_STEPS = 3320  # optimizer steps in all; may be raised on resume to train longer
STAGES = ""  # steps of each stage, e.g. "30,30": fresh optimizer and schedule at each; sets MAX_STEPS
BATCH_SIZE = 32  # windows of BLOCK_SIZE characters per micro-batch, per process
GRAD_ACCUM_STEPS = 1  # micro-batches summed into each optimizer step, for a larger batch in the same memory
LEARNING_RATE = 6e-3  # peak learning rate, reached after warmup
MIN_LR = 0.0  # the decay ends here at MAX_STEPS
WARMUP_STEPS = 100  # linear warmup from 0 to LEARNING_RATE
COOLDOWN = 0.6  # 0: cosine decay to MIN_LR; else hold LEARNING_RATE, then decay linearly over this last fraction
MUON = True  # Muon for the blocks' matrices (AdamW for embeddings, head, biases and norms); False: AdamW for all
WEIGHT_DECAY = 0.02  # decoupled decay on matrices and embeddings (not biases or norms), both optimizers
BETA1 = 0.8  # AdamW first-moment decay
BETA2 = 0.95  # AdamW second-moment decay
ADAM_EPS = 1e-10  # AdamW's term that keeps a tiny second moment from blowing up a step
BIGRAM_LR = 5.0  # the bigram table's learning rate, in multiples of the rest's (its rows start at zero)
GRAD_CLIP = 1.0  # clip the gradient's global norm to this; 0 turns clipping off
SEED = 1337  # seeds the weights, dropout and sampling
DEVICE = "auto"  # auto (cuda, else cpu), cpu, cuda, cuda:1, mps (Apple silicon: only when named, not under torchrun)
COMPILE = False  # torch.compile the model (CUDA and CPU; ignored on MPS)
# Deterministic kernels (torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG=:4096:8): on CUDA
# two runs with the same seed then log the same loss at every step, at some cost in speed. CPU runs
# are exact without it.
DETERMINISTIC = False

# --- evaluation and progress ---
LOG_INTERVAL = 50  # print a progress line and append to metrics.jsonl every this many steps
EVAL_INTERVAL = 500  # validation loss every this many steps, and at the end
EVAL_CHARS = 500_000  # validation characters: the whole split up to this (0: no limit), else a sample across it
WANDB_PROJECT = ""  # also log metrics.jsonl's rows and the settings to this Weights & Biases project; empty: off
SAMPLE_INTERVAL = 0  # print a short sample from PROMPT (TOP_K, TEMPERATURE) every this many steps, and log it; 0: off
SAMPLE_CHARS = 200  # tokens in each such sample (characters, with the char tokenizer)
EVAL_ONLY = False  # evaluate CHECKPOINT, or the newest in OUT_DIR, on the whole validation split (unless --eval_chars)

# --- checkpoints ---
OUT_DIR = "checkpoints"  # checkpoints and metrics.jsonl go here
CHECKPOINT_INTERVAL = 500  # save every this many steps, and at the end
KEEP_CHECKPOINTS = 2  # the newest this many checkpoints are kept
RESUME = True  # continue from the newest checkpoint in OUT_DIR; False starts fresh and replaces them
# fine-tune: a fresh run (its own optimizer, schedule, data stream, step 0) from this checkpoint's weights, a file
# or a run folder (its newest intact checkpoint); the model's shape and tokenizer are the checkpoint's, with the
# data's characters its vocabulary lacks added. Empty: random weights
INIT_FROM = ""
CHECKPOINT = ""  # a checkpoint file to sample or --eval_only; empty takes the newest in OUT_DIR

# --- sampling ---
PROMPT = "Once upon a time"  # the text to continue; empty starts a new story
MAX_NEW_TOKENS = 500  # tokens to generate at most (characters, with the char tokenizer)
NUM_SAMPLES = 1  # samples drawn in one batch
GREEDY = False  # always take the likeliest character (same as TEMPERATURE=0)
TEMPERATURE = 0.8  # below 1 is safer, above 1 is wilder; 0 is greedy
TOP_K = 20  # sample among the k likeliest characters only; 0 means all
IGNORE_EOS = False  # keep going past the end-of-story token

# --- explain ---
TEXT = ""  # explain.py: the text to explain; not given: story STORY of DATASET's validation split, or with --prompt the model's own story
STORY = 0  # explain.py: which story of the validation split to explain (0: the first)
OUT = "explain.html"  # explain.py: the page to write
PNG = ""  # explain.py: a folder to write the page's pictures to as PNG files too (needs matplotlib); empty: none

# --- every command ---
DEBUG = False  # show the full traceback instead of a one-line error


class UserError(Exception):
    """A problem the user can fix: the scripts print it as one line, without a traceback."""


def command(main):
    """Run main(sys.argv[1:]) as the scripts do: a UserError ends it as one line on stderr and exit code 2
    (--debug shows the traceback); an interrupt that main lets through, with exit code 130."""
    try:
        main(sys.argv[1:])
    except UserError as e:
        if "--debug" in sys.argv:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def load(argv, doc=None, reads=()):
    """The settings as a dict of lower-case names, with argv's --key=value (or --key value) overrides; a
    bare --flag sets a True/False setting to True. With -h or --help, print usage(doc, reads) and exit."""
    if "-h" in argv or "--help" in argv:
        print(usage(doc or "", reads))
        raise SystemExit(0)
    settings = {k.lower(): v for k, v in globals().items() if k.isupper()}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: settings are given as --key=value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_").lower()
        if key not in settings:
            close = difflib.get_close_matches(key, settings, n=1)
            hint = f"; did you mean --{close[0]}?" if close else "; the settings are in config.py"
            raise UserError(f"unknown setting --{key}{hint}")
        if not eq:
            if isinstance(settings[key], bool) and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
                value = "true"
            elif i + 1 < len(argv):
                i, value = i + 1, argv[i + 1]
            else:
                raise UserError(f"--{key} needs a value, as in --{key}=VALUE")
        settings[key] = _convert(key, value, settings[key])
        i += 1
    return settings


def check(cfg, argv, inherited=()):
    """Refuse settings no run can use and fill in those that follow: cfg["stages"] a list (MAX_STEPS its sum),
    a warmup cut to a short run, and the inherited keys left to INIT_FROM's checkpoint unless argv names them."""
    positive = ("block_size", "n_layer", "n_head", "n_embd", "max_steps", "batch_size", "grad_accum_steps",
                "learning_rate", "log_interval", "eval_interval", "checkpoint_interval", "keep_checkpoints",
                "tokenizer_stories", "holdout_every", "adam_eps", "shift_reach")
    non_negative = ("min_lr", "warmup_steps", "weight_decay", "grad_clip", "eval_chars", "sample_interval",
                    "sample_chars", "temperature", "top_k", "mlp_hidden", "bigram", "bigram_lr")
    for key in (*positive, *non_negative):  # the positive ones first
        if cfg[key] < 0 or (cfg[key] == 0 and key in positive):
            raise UserError(f"--{key} must {'be positive' if key in positive else 'not be negative'}, not {cfg[key]}")
    if not 0 <= cfg["cooldown"] <= 1:
        raise UserError(f"--cooldown is a fraction of the run, from 0 to 1, not {cfg['cooldown']}")
    if not 0 <= cfg["dropout"] < 1 or not 0 <= cfg["beta1"] < 1 or not 0 <= cfg["beta2"] < 1:
        raise UserError("--dropout, --beta1 and --beta2 must be at least 0 and below 1")
    if cfg["n_embd"] % cfg["n_head"]:
        raise UserError(f"--n_embd={cfg['n_embd']} does not split into --n_head={cfg['n_head']} heads: "
                        "make n_embd a multiple of n_head")
    if cfg["rope"] and cfg["n_embd"] // cfg["n_head"] % 2:  # rotary turns pairs of a head's channels
        raise UserError(f"--rope turns pairs of channels, and a head here has an odd number "
                        f"({cfg['n_embd']} / {cfg['n_head']}): make n_embd / n_head even, or pass --rope=False")
    if cfg["stages"]:
        try:
            stages = [int(s) for s in cfg["stages"].split(",")]
        except ValueError:
            raise UserError(f"--stages takes step counts separated by commas, as in --stages=30,30, "
                            f"not {cfg['stages']!r}") from None
        if min(stages) <= 0:
            raise UserError(f"every stage needs at least one step: --stages={cfg['stages']}")
        if cfg["max_steps"] not in (MAX_STEPS, sum(stages)):
            raise UserError(f"--stages={cfg['stages']} adds up to {sum(stages)} steps but --max_steps is "
                            f"{cfg['max_steps']}: leave --max_steps out, or make the two agree")
        cfg["stages"], cfg["max_steps"] = stages, sum(stages)
    else:
        cfg["stages"] = [cfg["max_steps"]]
    named = {arg.split("=")[0].replace("-", "_").lower()[2:] for arg in argv}
    if cfg["eval_only"] and "eval_chars" not in named:
        cfg["eval_chars"] = 0  # the whole validation split
    shortest, what = min(cfg["stages"]), "shortest stage" if len(cfg["stages"]) > 1 else "run"
    if cfg["warmup_steps"] > shortest:
        if "warmup_steps" in named:
            raise UserError(f"--warmup_steps={cfg['warmup_steps']} is longer than the {what} ({shortest} steps): "
                            "lower --warmup_steps")
        # Not asked for by name: a short run (--max_steps=50) should just work.
        cfg["warmup_steps"] = shortest // 10
        if os.environ.get("RANK", "0") == "0":
            print(f"note: warmup of {cfg['warmup_steps']} steps, a tenth of the {shortest}-step {what} "
                  f"(WARMUP_STEPS={WARMUP_STEPS} is longer than it; --warmup_steps sets it)")
    if cfg["init_from"] and not cfg["eval_only"]:  # None: checkpoint.inherit takes the checkpoint's
        cfg.update({key: None for key in inherited if key not in named})


def _convert(key, value, default):
    """value (a string) as the type of the setting's default."""
    kind = type(default)
    if kind is bool:
        answers = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
        if value.lower() not in answers:
            raise UserError(f"--{key} takes True or False, not {value!r}")
        return answers[value.lower()]
    if kind is str:
        return value
    try:
        if kind is int:
            number = float(value)  # accepts 1e4 and 5_000 as well as 5000
            if number != int(number):
                raise ValueError
            return int(number)
        return kind(value)
    except ValueError:
        raise UserError(f"--{key} takes a{'n' if kind is int else ''} {kind.__name__}, not {value!r}") from None


def usage(doc, reads):
    """A command's help: its docstring's first two paragraphs, then the settings it reads (reads: this file's
    group names or setting names) with their defaults and this file's comments, the one source of both."""
    lines = ["\n\n".join(doc.strip().split("\n\n")[:2]), "",
             "Settings (config.py; --key=value overrides one for a run):"]
    for group, settings in documented().items():
        shown = [(name, note) for name, note in settings if group in reads or name in reads]
        if shown:
            lines.append(f"\n{group}:")
        for name, note in shown:
            value = globals()[name] if globals()[name] != "" else '""'
            flag = f"  --{name.lower()}={value}"
            lines.append(textwrap.fill(note, 110, initial_indent=f"{flag:<31} ", subsequent_indent=" " * 32))
    return "\n".join(lines)


def documented():
    """{group: [(NAME, comment)]} in this file's order, read from its own lines: a setting's comment
    is the one on its line, or else the comment lines right above it."""
    groups, group, above = {}, None, []
    for line in Path(__file__).read_text(encoding="utf-8").splitlines():
        head = re.fullmatch(r"# --- (.+) ---", line)
        setting = re.match(r"([A-Z][A-Z0-9_]*) = .*?(?:  # (.*))?$", line)
        if head:
            group = groups.setdefault(head[1], [])
        elif setting and group is not None:
            group.append((setting[1], setting[2] or " ".join(above)))
        above = above + [line[2:]] if line.startswith("# ") and not head else []
    return groups
