"""What a training run leaves to read: OUT_DIR/metrics.jsonl, one JSON object per progress line
and per evaluation, and OUT_DIR/loss.png, the loss curve drawn from it. With WANDB_PROJECT set, the
same rows also go to Weights & Biases, with the settings as the run's config."""

import json
from pathlib import Path

from config import UserError


class Metrics:
    """OUT_DIR/metrics.jsonl, and with WANDB_PROJECT the same rows logged to W&B (wandb imported only
    then). wandb_id: the W&B run a resumed run continues, kept in its checkpoint; self.wandb_id, the one to keep."""

    def __init__(self, out_dir, resume_step, cfg, wandb_id=None):
        self.wandb, self.wandb_id = None, wandb_id  # an id is kept even by a run that does not log to W&B
        if cfg["wandb_project"]:
            try:
                import wandb
            except ImportError:
                raise UserError(f"--wandb_project={cfg['wandb_project']} needs the wandb package: pip install "
                                "\"wandb>=0.31\" (or leave --wandb_project empty)") from None
            # resume="allow": the run of that id if W&B has it, else a new run of that id. Steps a resumed run
            # logs again (those after its checkpoint) are dropped by W&B; on CPU they are the same numbers.
            self.wandb = wandb.init(project=cfg["wandb_project"], id=wandb_id, resume="allow", config=cfg)
            self.wandb_id = self.wandb.id
        self.path = Path(out_dir) / "metrics.jsonl"
        if self.path.exists():  # drop what a stopped run logged after its last checkpoint
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except ValueError:  # a line cut short by a killed run
                    pass
            self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, **row):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self):
        if self.wandb:
            self.wandb.finish()


def plot_losses(out_dir, chars_per_step):
    """OUT_DIR/loss.png: the training and validation loss of metrics.jsonl against characters
    seen. Skipped without a word where matplotlib is not installed: training never needs it."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    except ImportError:
        return
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    fig = Figure(figsize=(6, 3.6), dpi=100)
    ax = fig.subplots()
    for key, label, style in (("loss", "train (one batch)", "-"), ("val_loss", "validation", "o-")):
        points = [(r["step"] * chars_per_step / 1e6, r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), style, label=label, markersize=3, linewidth=1)
    ax.set_xlabel("characters seen (millions)")
    ax.set_ylabel("loss (nats per character)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(out_dir) / "loss.png")
