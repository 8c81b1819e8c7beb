"""What a user watches while the program trains: a progress line on rank 0 and a JSON-lines log.

Copied verbatim beside every emitted ``program.py`` (standard library and torch only; tqdm draws
the bar when it is installed and stderr is a terminal, a plain line otherwise). Each step writes one line to the metrics file
(rank 0; ``DIR/metrics.jsonl`` unless ``--metrics PATH``):

    {"step": 3, "loss": 4.12, "tokens": 1024, "step_s": 0.021, "tokens_per_s": 12190.5}

``tokens`` counts every token trained on up to and including the step; ``val_loss`` is added on
steps that computed one, and ``mfu`` (model FLOPs utilisation: the plan's forward+backward FLOPs of
a step / the step's seconds / (one device's peak FLOP/s x devices); PaLM, Chowdhery et al. 2022,
appendix B) on GPUs. ``ultraplan report DIR`` draws it.
"""

import json
import os
import sys
import time

import torch


def add_arguments(parser):
    """The program's progress flags (parse_args); --quiet is the program's own."""
    parser.add_argument("--metrics", default=None,
                        help="write one JSON line per step here (default: metrics.jsonl beside program.py)")


def metrics_path(args, program_file):
    """--metrics, or metrics.jsonl in the program's directory."""
    return args.metrics or os.path.join(os.path.dirname(os.path.abspath(program_file)), "metrics.jsonl")


def _bar(steps, start_step, quiet):
    """A tqdm bar when tqdm is installed, wanted and drawn on a terminal, else None (the plain line;
    a log file gets one line per step rather than a bar's redraws)."""
    if quiet or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=steps, initial=start_step, unit="step", dynamic_ncols=True)


class Meter:
    """Times each step, shows it on rank 0 (unless quiet) and logs it to the metrics file.

    ``start_step`` > 0 (a resumed run) keeps the file's lines of the steps before it and drops the
    rest, so the file always holds one line per step of the run that led here.
    """

    def __init__(self, path, rank, steps, tokens_per_step, flops_per_step, peak_flops, devices, quiet=False,
                 start_step=0):
        self.rank, self.steps, self.quiet = rank, steps, quiet
        self.tokens_per_step, self.tokens = tokens_per_step, tokens_per_step * start_step
        self.gpu = torch.cuda.is_available()
        self.peak = peak_flops * devices if self.gpu and peak_flops else 0.0
        self.flops_per_step = flops_per_step
        self.file = None
        self.bar = None
        self.tty = sys.stdout.isatty()
        if rank == 0:
            kept = _lines_before(path, start_step) if start_step > 0 else []
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.file = open(path, "w", buffering=1)  # line-buffered: `tail -f` sees each step
            self.file.writelines(kept)
            self.bar = _bar(steps, start_step, quiet)
        self.started = time.perf_counter()

    def lap(self):
        """Seconds since the last step ended (or since the meter was made), after the device finished."""
        if self.gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - self.started

    def log(self, step, loss, seconds, val_loss=None):
        """Record the step; then restart the clock (time spent here and in validation is not a step's)."""
        self.tokens += self.tokens_per_step
        record = {"step": step, "loss": loss, "tokens": self.tokens, "step_s": seconds,
                  "tokens_per_s": self.tokens_per_step / seconds if seconds > 0 else None}
        if val_loss is not None:
            record["val_loss"] = val_loss
        if self.peak and seconds > 0:
            record["mfu"] = self.flops_per_step / seconds / self.peak
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self._show(record)
        self.started = time.perf_counter()

    def _show(self, r):
        if self.quiet:
            return
        text = f"loss {r['loss']:.6f}"
        if r.get("val_loss") is not None:
            text += f"  val {r['val_loss']:.4f}"
        if r["tokens_per_s"] is not None:
            text += f"  {r['tokens_per_s']:,.0f} tok/s"
        if "mfu" in r:
            text += f"  mfu {r['mfu']:.1%}"
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif self.tty:  # one line, rewritten in place
            print(f"\rstep {r['step'] + 1}/{self.steps}  {text}\033[K", end="", flush=True)
        else:  # a log file: one line per step
            print(f"step {r['step']:4d}  {text}", flush=True)

    def close(self):
        """End the bar or the in-place line and close the metrics file."""
        if self.bar is not None:
            self.bar.close()
        elif self.file is not None and self.tty and not self.quiet:
            print(flush=True)
        if self.file is not None:
            self.file.close()
            self.file = None


def _lines_before(path, start_step):
    """The metrics file's lines of steps before ``start_step`` (none when there is no file)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line for line in f if line.strip() and json.loads(line)["step"] < start_step]
