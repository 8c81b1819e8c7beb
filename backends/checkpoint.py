"""checkpoint.py: save training state with torch.distributed.checkpoint (DCP) and resume from it,
under the same plan or another one (DCP reshards on load).

This file must import nothing but torch and the standard library: it is copied verbatim next to
every emitted program. The program passes in its model, optimizer and PARAMS table (canonical
name, SBP, optimizer group); nothing here knows a model.

A checkpoint directory (``--checkpoint-dir DIR``) holds one folder per save::

    DIR/step-00000010/            one DCP checkpoint (each rank's .distcp file and DCP's .metadata)
    DIR/step-00000010/COMPLETE    written by rank 0 after every rank finished saving (temp + rename)

A folder without COMPLETE is a save that did not finish (a crash or kill during it): ``--resume``
never picks it, and a later save at the same step replaces it. The DCP state dict's keys (nested
dicts, which DCP flattens with "."):

- ``model.NAME``: each parameter as a DTensor on the program's DeviceMesh, placements from its SBP
  (S(d) -> Shard(d), B -> Replicate(); several axes splitting one dim split it axis 0 outermost,
  as runtime.py and DTensor both do);
- ``optim.NAME.exp_avg``, ``optim.NAME.exp_avg_sq``: AdamW's moments, sharded as their parameter;
  ``optim.NAME.step``: its step count (a scalar, the same on every rank);
- ``buffers.NAME``: non-parameter state (seeded permutations, state derived from parameters with
  its previous value), the same on every rank;
- ``progress.step`` (steps completed) and ``progress.seed``: batches are a function of
  (seed, step), so these are the data position.

The names are the canonical ones (the eager model's state_dict keys), the same under every plan,
so a checkpoint written under one plan loads under another: DCP's DefaultLoadPlanner reads, for
each DTensor, the saved chunks that overlap this rank's shard (torch/distributed/checkpoint/
default_planner.py, create_default_local_load_plan), whatever the placements were when it was
written. The learning rate is recomputed from the step; AdamW's other settings are the program's
constants.

``--checkpoint-async`` saves with ``dcp.async_save``: the state is copied to CPU memory before the
call returns and written by a background thread while training goes on; that thread's collectives
use a process group of their own (gloo), as a second thread issuing collectives on the training
groups could interleave them differently on different ranks. A save's COMPLETE is written when the
next save starts or training ends (after waiting for it and a barrier).
"""

import json
import os
import re
import shutil
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor, Replicate, Shard

MARKER = "COMPLETE"
FOLDER = re.compile(r"^step-(\d{8})$")
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-parameter tensors (amsgrad off), besides "step"


def add_args(parser):
    """The checkpoint flags, and where to write the losses of the steps run (with their numbers)."""
    parser.add_argument("--checkpoint-dir", default=None, help="save checkpoints (DCP) into this directory")
    parser.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                        help="save after every N-th step (and after the last); 0: after the last step only")
    parser.add_argument("--checkpoint-async", action="store_true",
                        help="write checkpoints in a background thread while training goes on (dcp.async_save)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest complete checkpoint in --checkpoint-dir (from step 0 if none)")
    parser.add_argument("--losses-out", default=None, metavar="PATH",
                        help="rank 0 writes the losses of the steps this run made, with their step numbers (JSON)")


# ---- placements ---------------------------------------------------------------------------------


def placements(sbp):
    """DTensor placements of a parameter stored under the nd-SBP ``sbp`` (one entry per mesh axis)."""
    out = []
    for entry in sbp:
        if entry == "B":
            out.append(Replicate())
        elif entry.startswith("S(") and entry.endswith(")") and entry[2:-1].isdigit():
            out.append(Shard(int(entry[2:-1])))
        else:  # "P": a parameter is never a partial sum
            raise ValueError(f"a checkpointed tensor cannot be placed {entry!r} (expected 'S(d)' or 'B')")
    return out


def full_shape(local, sbp, mesh_shape, logical=None):
    """The logical shape of a tensor whose shard on this rank is ``local``.

    ``logical`` (or ``local.full_shape``, which runtime.param sets on every parameter) wins: where a
    split does not divide (a value table's rows in torch.chunk's shares, passes/sbp.py's ``fits``) the
    ranks' shards differ and none of them times the mesh is the whole; DTensor's ``Shard`` takes the
    same shares (torch.chunk's), so the DTensor of that shape holds this rank's rows where they are.
    Without it the shard is even and the shape is the shard's times the mesh axes splitting it."""
    logical = logical if logical is not None else getattr(local, "full_shape", None)
    if logical is not None:
        return tuple(int(d) for d in logical)
    shape = list(local.shape)
    for axis, placement in enumerate(placements(sbp)):
        if isinstance(placement, Shard):
            shape[placement.dim] *= mesh_shape[axis]
    return tuple(shape)


def as_dtensor(local, mesh, sbp, logical=None):
    """``local`` (this rank's shard, sharing its storage) as a DTensor of its logical shape (``full_shape``)."""
    shape = full_shape(local, sbp, mesh.shape, logical)
    stride = [1] * len(shape)
    for d in reversed(range(len(shape) - 1)):
        stride[d] = stride[d + 1] * shape[d + 1]
    return DTensor.from_local(local.detach(), mesh.device_mesh, placements(sbp), run_check=False,
                              shape=torch.Size(shape), stride=tuple(stride))


# ---- the state ----------------------------------------------------------------------------------


def training_state(model, optimizer, params, mesh, step, seed, fill_optimizer=False):
    """The DCP state dict of a training run after ``step`` steps (the module docstring lists it).

    A parameter the optimizer has not stepped yet has no AdamW state; it is saved as AdamW starts
    it (zero moments, step 0). ``fill_optimizer`` (before a load) gives every parameter that state
    inside the optimizer, so the load fills tensors AdamW then uses as they are.
    """
    state = {"model": {}, "optim": {}, "buffers": {}, "progress": {"step": int(step), "seed": int(seed)}}
    for name, sbp, _ in params:
        param = model.get_parameter(name)
        moments = optimizer.state.get(param) or {}
        if not moments:
            moments = {"step": torch.tensor(0.0), **{k: torch.zeros_like(param.detach()) for k in MOMENTS}}
            if fill_optimizer:
                optimizer.state[param] = moments
        logical = full_shape(param, sbp, mesh.shape)  # the moments are shaped as their parameter's shard
        state["model"][name] = as_dtensor(param, mesh, sbp, logical)
        state["optim"][name] = {"step": moments["step"],
                                **{k: as_dtensor(moments[k], mesh, sbp, logical) for k in MOMENTS}}
    for name, buffer in model.named_buffers():
        state["buffers"][name] = buffer
    return state


def check_optimizer(optimizer):
    """The state saved is AdamW's without amsgrad; say so clearly for anything else."""
    if not isinstance(optimizer, torch.optim.AdamW) or any(g.get("amsgrad") for g in optimizer.param_groups):
        raise ValueError("checkpoints hold AdamW's state (exp_avg, exp_avg_sq, step); this optimizer is "
                         f"{type(optimizer).__name__}")


# ---- folders and markers ------------------------------------------------------------------------


def folder(directory, step):
    return os.path.join(directory, f"step-{int(step):08d}")


def read_marker(path):
    """The COMPLETE record of the checkpoint folder ``path``, or None when it is not complete."""
    try:
        with open(os.path.join(path, MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def latest(directory):
    """(folder, record) of the complete checkpoint with the most steps in ``directory``, or None."""
    if not os.path.isdir(directory):
        return None
    found = []
    for entry in os.listdir(directory):
        match = FOLDER.match(entry)
        record = read_marker(os.path.join(directory, entry)) if match else None
        if record is not None and record.get("step") == int(match.group(1)):
            found.append((int(match.group(1)), os.path.join(directory, entry), record))
    if not found:
        return None
    _, path, record = max(found)
    return path, record


def write_atomically(path, text):
    """``path`` holds ``text`` whole or does not exist: a crash leaves at most a stray temporary file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---- saving and resuming ------------------------------------------------------------------------


def check_same_batches(path: str, record: dict, seed: int, data: str | None) -> None:
    """Refuse to resume a checkpoint whose run drew its batches otherwise: batches are a function of
    (seed, step) and the token file (backends/train_data.py), so another seed or file would silently
    continue on other data. A file is compared by its resolved path (./a.bin and a.bin match)."""
    if record.get("seed") != seed:
        raise SystemExit(f"{path} was saved by a run with --seed {record.get('seed')}, not {seed}: "
                         f"the batches after it would differ; pass --seed {record.get('seed')}")
    saved = record.get("data")
    if (os.path.realpath(saved) if saved else None) != (os.path.realpath(data) if data else None):
        fix = f"pass --data {saved}" if saved else "drop --data"
        raise SystemExit(f"{path} was saved by a run reading {saved or 'random batches'}, not "
                         f"{data or 'random batches'}: the batches after it would differ; {fix} to resume it")


class Checkpointer:
    """Saves after every ``--checkpoint-every`` steps and after the last; resumes on ``--resume``.

    Every rank makes the same calls in the same order (each save and load is collective).
    ``record`` is what COMPLETE says besides the step (spec name, mesh, dtype): for a reader, and
    the parameters' logical shapes, checked before a load so a checkpoint of another model is one
    clear line rather than DCP's error.
    """

    def __init__(self, args, mesh, model, optimizer, params, record):
        self.directory = args.checkpoint_dir
        self.every = args.checkpoint_every
        self.total = args.steps
        self.seed = args.seed
        self.mesh, self.model, self.optimizer, self.params = mesh, model, optimizer, params
        self.record = dict(record)
        self.pending = None  # (future, step, folder) of an async save not yet marked complete
        self.group = None
        if self.every < 0:
            raise SystemExit(f"--checkpoint-every must be at least 0, got {self.every}")
        if (args.resume or self.every or args.checkpoint_async) and not self.directory:
            raise SystemExit("--resume, --checkpoint-every and --checkpoint-async need --checkpoint-dir DIR "
                             "(the directory checkpoints are saved in)")
        if self.directory:
            check_optimizer(optimizer)
            if args.checkpoint_async:
                self.group = mesh.new_group(backend="gloo")  # the background thread's own collectives
        self.resume_requested = args.resume
        self.quiet = args.quiet

    def shapes(self):
        return {name: list(full_shape(self.model.get_parameter(name), sbp, self.mesh.shape))
                for name, sbp, _ in self.params}

    def resume(self):
        """Load the latest complete checkpoint (when --resume); return the step to continue from."""
        if not self.resume_requested:
            return 0
        found = [latest(self.directory) if self.mesh.rank == 0 else None]
        dist.broadcast_object_list(found, src=0)  # one choice for all, even if a save completes meanwhile
        if found[0] is None:
            if self.mesh.rank == 0 and not self.quiet:
                print(f"resume: no complete checkpoint in {self.directory}; starting at step 0", flush=True)
            return 0
        path, record = found[0]
        check_same_batches(path, record, self.seed, self.record.get("data"))
        mine = self.shapes()
        if record.get("params") != mine:
            theirs = record.get("params") or {}
            diff = sorted(set(theirs) ^ set(mine)) or sorted(k for k in mine if theirs.get(k) != mine[k])
            raise SystemExit(f"{path} holds another model's parameters ({record.get('spec')}): they differ "
                             f"in {', '.join(diff[:3])}; resume with the spec it was saved from")
        state = training_state(self.model, self.optimizer, self.params, self.mesh, 0, 0, fill_optimizer=True)
        dcp.load(state, checkpoint_id=path)
        with torch.no_grad():  # loaded in place; copy anyway in case DCP wrote to other storage
            for name, _, _ in self.params:
                param = self.model.get_parameter(name)
                loaded = state["model"][name].to_local()
                if loaded.data_ptr() != param.data_ptr():
                    param.copy_(loaded)
        step = int(state["progress"]["step"])
        if step != record["step"] or int(state["progress"]["seed"]) != self.seed:
            raise SystemExit(f"{path}: its state says step {step}, its COMPLETE record step {record['step']}")
        if self.mesh.rank == 0 and not self.quiet:
            print(f"resume: step {step} from {path} (saved on mesh {tuple(record.get('mesh', ()))}, "
                  f"now {self.mesh.shape})", flush=True)
        return step

    def after_step(self, done):
        """Called after each optimizer step with the steps completed; saves when it is time."""
        if self.directory and (done == self.total or (self.every and done % self.every == 0)):
            self.save(done)

    def save(self, step):
        path = folder(self.directory, step)
        self.finish()  # an earlier async save completes (and is marked) before the next starts
        if self.mesh.rank == 0:
            os.makedirs(self.directory, exist_ok=True)
            if os.path.exists(path):  # left by an earlier run: unmark first, so it is never half-complete
                if os.path.exists(os.path.join(path, MARKER)):
                    os.remove(os.path.join(path, MARKER))
                shutil.rmtree(path)
        dist.barrier()
        state = training_state(self.model, self.optimizer, self.params, self.mesh, step, self.seed)
        if self.group is None:
            dcp.save(state, checkpoint_id=path)
            self.mark(step, path)
        else:
            self.pending = (dcp.async_save(state, checkpoint_id=path, process_group=self.group), step, path)

    def finish(self):
        """Wait for an async save still being written and mark it complete."""
        if self.pending is not None:
            future, step, path = self.pending
            self.pending = None
            future.result()
            self.mark(step, path)

    def mark(self, step, path):
        """After every rank's part is written (the barrier), rank 0 writes COMPLETE atomically."""
        dist.barrier()
        if self.mesh.rank == 0:
            record = {"step": int(step), "seed": self.seed, "mesh": list(self.mesh.shape),
                      "params": self.shapes(), "time": time.time(), **self.record}
            write_atomically(os.path.join(path, MARKER), json.dumps(record, indent=1))
            if not self.quiet:
                print(f"checkpoint: step {step} saved in {path}", flush=True)


def write_losses(path, mesh, first_step, losses):
    """Rank 0 writes {"steps": [...], "losses": [...]} to ``path``: the steps this run made."""
    if path and mesh.rank == 0:
        steps = list(range(first_step, first_step + len(losses)))
        write_atomically(path, json.dumps({"steps": steps, "losses": losses}))
