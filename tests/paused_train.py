"""train.py as a user runs it, slowed down where the fault tests aim their signals:

    python tests/paused_train.py SAVE_PAUSE STEP_PAUSE --train_py_setting=value ...

Each checkpoint is written half, then SAVE_PAUSE seconds pass before the rest (a signal in that
pause lands inside a save), after the line "test: saving step N" on stdout; each training step
waits STEP_PAUSE seconds for its batch, so that a signal sent at a progress line lands before the
run ends. The arithmetic is train.py's own: the weights come out as they would without the pauses.
"""

import io
import runpy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import checkpoint  # noqa: E402  (train.py imports these same modules, so it sees the pauses)
import data  # noqa: E402

save_pause, step_pause = float(sys.argv[1]), float(sys.argv[2])
save, next_batch = checkpoint.torch.save, data.Batches.__next__


def paused_save(obj, f):
    written = io.BytesIO()
    save(obj, written)
    half = written.tell() // 2
    f.write(written.getvalue()[:half])
    f.flush()
    print(f"test: saving step {obj['step']}")  # arrives only if train.py's stdout passes lines on as printed
    time.sleep(save_pause)
    f.write(written.getvalue()[half:])


def paused_next(self):
    if not self.once:  # a training batch, not one of the validation text's
        time.sleep(step_pause)
    return next_batch(self)


checkpoint.torch.save, data.Batches.__next__ = paused_save, paused_next
sys.argv = [str(ROOT / "train.py"), *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
