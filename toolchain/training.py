"""One training loop for training from scratch and for fine-tuning compressed models.

SGD with Nesterov momentum, a one-cycle or cosine schedule stepped per batch,
per-image crop+flip augmentation, optional distillation from a teacher model.
A checkpoint is written after every epoch; `resume` continues from it.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .data import CIFAR10_MEAN, CIFAR10_STD, Split, batches
from .distributed import data_parallel, sum_over_processes
from .errors import ConfigError
from .models import bn_affine, set_bn_affine
from . import settings


@dataclass
class TrainConfig:
    epochs: int = settings.TRAIN_EPOCHS
    batch_size: int = settings.TRAIN_BATCH_SIZE
    lr: float = settings.TRAIN_LR  # peak learning rate
    weight_decay: float = settings.WEIGHT_DECAY
    momentum: float = 0.9
    schedule: str = settings.SCHEDULES[0]  # onecycle or cosine
    label_smoothing: float = 0.0
    seed: int = settings.SEED
    distill_temperature: float = settings.DISTILL_TEMPERATURE  # used only when a teacher is given
    distill_weight: float = 0.9  # share of the loss that follows the teacher
    # With a teacher of the same block layout: weight of the residual blocks' outputs matched to the
    # teacher's (relative squared error, averaged over blocks), added to the logit distillation.
    feature_distill_weight: float = 0.0

    def __post_init__(self):
        if self.schedule not in settings.SCHEDULES:
            raise ConfigError(f"schedule must be {' or '.join(settings.SCHEDULES)}, got {self.schedule!r}")
        if self.epochs < 0 or self.batch_size < 1 or not self.lr > 0:
            raise ConfigError("epochs must be >= 0, batch size >= 1 and lr > 0")


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    train_accuracy: float
    test_accuracy: float | None
    seconds: float
    lr: float


def make_optimizer(model: nn.Module, cfg: TrainConfig, steps_per_epoch: int):
    # No weight decay on BN parameters and biases: the usual choice for ResNets.
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim > 1]
    no_decay = [p for p in trainable if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total,
                                                    pct_start=0.15, div_factor=10.0,
                                                    final_div_factor=100.0)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    return opt, sched


def distillation_loss(logits, labels, teacher_logits, cfg: TrainConfig):
    t = cfg.distill_temperature
    soft = F.kl_div(F.log_softmax(logits / t, 1), F.softmax(teacher_logits / t, 1),
                    reduction="batchmean") * t * t
    hard = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
    return cfg.distill_weight * soft + (1 - cfg.distill_weight) * hard


@contextmanager
def block_outputs(model: nn.Module | None):
    """The outputs of `model`'s residual blocks during the forward passes run inside (none for None)."""
    from .models import BasicBlock

    outputs: list[torch.Tensor] = []
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)] if model is not None else []
    handles = [b.register_forward_hook(lambda _m, _args, out: outputs.append(out)) for b in blocks]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def feature_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of ||student - teacher||^2 / ||teacher||^2: every block counts alike, whatever its scale."""
    if len(student) != len(teacher) or any(s.shape != t.shape for s, t in zip(student, teacher)):
        raise ConfigError("feature distillation needs the teacher's residual blocks, output for output")
    return sum(((s - t) ** 2).mean() / (t ** 2).mean().clamp_min(1e-12) for s, t in zip(student, teacher)) / len(teacher)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 100,
             mean=CIFAR10_MEAN, std=CIFAR10_STD, progress: bool = False) -> float:
    """Top-1 accuracy (0..1) of a PyTorch model on a split.

    Batches of 100 by default: small enough for the activations to stay in the CPU's caches."""
    was_training = model.training
    model.eval()
    correct = 0
    it = batches(split, batch_size, mean=mean, std=std)
    if progress:
        it = tqdm(it, total=math.ceil(len(split) / batch_size), desc="evaluating", leave=False, disable=None)
    for x, y in it:
        correct += (model(x.contiguous(memory_format=torch.channels_last)).argmax(1) == y).sum().item()
    model.train(was_training)
    return correct / max(1, len(split))


@torch.no_grad()
def recalibrate_bn(model: nn.Module, split: Split, images: int = 2048, batch_size: int = 256,
                   seed: int = 0, mean=CIFAR10_MEAN, std=CIFAR10_STD, keep_outputs: bool = False) -> None:
    """Re-estimate BatchNorm running statistics on training images (after weights changed).

    keep_outputs: measure each BN's input statistics under the model's current eval-mode function
    and rescale its affine so that this function is kept. For a model refit against the old
    statistics: train mode (batch statistics) then computes what eval mode computes, so
    fine-tuning starts from the refit model instead of a blurred one.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    was_training = model.training
    calibration = (x for x, _ in batches(split.subset(images, seed), batch_size, mean=mean, std=std))
    if keep_outputs:
        _restate_keeping_function(model, bns, calibration)
    else:
        _reestimate(model, bns, calibration)
    model.train(was_training)


def _reestimate(model: nn.Module, bns: list[nn.BatchNorm2d], calibration) -> None:
    """Running statistics from train-mode passes (each BN sees its batch-normalised inputs)."""
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    model.train()
    for x in calibration:
        model(x)
    for m, momentum in zip(bns, saved):
        m.momentum = momentum


def _restate_keeping_function(model: nn.Module, bns: list[nn.BatchNorm2d], calibration) -> None:
    """Running statistics of each BN's inputs under the eval-mode function, affine rescaled to keep it."""
    sums = {m: [0.0, 0.0, 0] for m in bns}  # per channel: sum, sum of squares; values per channel

    def hook(m, args):
        x = args[0].double()
        sums[m][0] += x.sum((0, 2, 3))
        sums[m][1] += (x * x).sum((0, 2, 3))
        sums[m][2] += x.numel() // x.shape[1]

    handles = [m.register_forward_pre_hook(hook) for m in bns]
    model.eval()
    try:
        for x in calibration:
            model(x)
    finally:
        for h in handles:
            h.remove()
    for m in bns:
        total, squares, n = sums[m]
        new_mean = (total / n).float()
        new_var = (squares / n - (total / n) ** 2).clamp_min(0).float() * n / max(1, n - 1)
        set_bn_affine(m, *bn_affine(m), new_mean, new_var)


def fit(model: nn.Module, train: Split, test: Split | None, cfg: TrainConfig, *,
        save=None, state: dict | None = None, teacher: nn.Module | None = None,
        mean=CIFAR10_MEAN, std=CIFAR10_STD, log=print, rank: int = 0,
        world_size: int = 1) -> list[EpochRecord]:
    """Train `model` for cfg.epochs; `save(history, state)` is called after every epoch.

    `state` is a dict from an earlier `save` (optimizer, scheduler, epoch, history) to resume.
    """
    torch.manual_seed(cfg.seed)
    steps = math.ceil(len(train) / world_size / cfg.batch_size)
    model = model.to(memory_format=torch.channels_last)
    opt, sched = make_optimizer(model, cfg, steps)
    history: list[EpochRecord] = []
    start_epoch = 0
    if state:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history = [EpochRecord(**r) for r in state["history"]]
        start_epoch = state["epoch"]
    if teacher is not None:
        teacher.eval()
    net = data_parallel(model, world_size)
    features = cfg.feature_distill_weight > 0 and teacher is not None  # block outputs in the loss
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        it = batches(train, cfg.batch_size, shuffle=True, augment_images=True,
                     seed=cfg.seed * 100_003 + epoch, mean=mean, std=std, rank=rank, world_size=world_size)
        bar = tqdm(it, total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=None if rank == 0 else True, mininterval=2.0)
        for x, y in bar:
            x = x.contiguous(memory_format=torch.channels_last)
            with block_outputs(model if features else None) as student_blocks:
                logits = net(x)
            if teacher is not None:
                with torch.no_grad(), block_outputs(teacher if features else None) as teacher_blocks:
                    teacher_logits = teacher(x)
                loss = distillation_loss(logits, y, teacher_logits, cfg)
                if features:
                    loss = loss + cfg.feature_distill_weight * feature_loss(student_blocks, teacher_blocks)
            else:
                loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
        loss_sum, correct, seen = sum_over_processes([loss_sum, correct, seen], world_size)
        test_acc = evaluate(model, test, mean=mean, std=std) if test is not None and rank == 0 else None
        record = EpochRecord(epoch + 1, loss_sum / max(1, seen), correct / max(1, seen), test_acc,
                             time.perf_counter() - t0, opt.param_groups[0]["lr"])
        history.append(record)
        if rank == 0:
            log(f"epoch {record.epoch}/{cfg.epochs}  loss {record.loss:.4f}  "
                f"train {record.train_accuracy:.4f}  "
                f"test {'-' if test_acc is None else f'{test_acc:.4f}'}  {record.seconds:.1f}s")
            if save is not None:
                save(history, {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                               "epoch": epoch + 1, "history": [asdict(r) for r in history],
                               "config": asdict(cfg)})
    return history


def train_checkpoint(arch: str, data, out, cfg: TrainConfig, *, resume: bool = False, force: bool = False,
                     init=None, command: str | None = None, limit: int | None = None,
                     test_limit: int | None = None, log=print, rank: int = 0, world_size: int = 1):
    """Train a CIFAR ResNet from scratch into checkpoint `out` (resuming from it if asked).

    `init` is a checkpoint whose weights the run starts from (a warm start with a new schedule).
    An existing `out` is never overwritten silently: resume it, or pass force=True.
    A resume must use the same settings: the schedule was laid out for them.
    """
    from pathlib import Path

    from .checkpoints import Checkpoint, load_state_strict, read_payload, save_checkpoint
    from .data import load_split
    from .errors import CheckpointError, ToolchainError
    from .models import build_model

    out = Path(out)
    if out.exists() and not resume and not force:
        raise ToolchainError(f"{out} already exists; pass --resume to continue it or --force to replace it")
    run_settings = {"arch": arch, "limit": limit, "init": str(init) if init else None, **asdict(cfg)}
    state = None
    if resume and out.is_file():
        payload = read_payload(out)
        state = payload.get("training_state")
        if state is None:
            raise CheckpointError(f"{out} holds no training state to resume from (finished or not ours)")
        changed = [k for k, v in state.get("settings", {}).items() if run_settings.get(k) != v]
        if changed:
            raise ToolchainError(f"cannot resume {out} with other settings ({', '.join(changed)}); "
                                 "repeat the original command with --resume")
        command = payload["meta"]["training"]["command"]
    train = load_split(data, "train").subset(limit, cfg.seed)
    test = load_split(data, "test").subset(test_limit, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(arch, len(train.classes))
    if state is not None:
        load_state_strict(model, payload["state_dict"], out)
        log(f"resuming from {out} after epoch {state['epoch']}")
    elif init is not None:
        from .checkpoints import load_checkpoint
        start = load_checkpoint(init, arch)
        model.load_state_dict(start.model.state_dict())
        log(f"starting from the weights of {init}")

    init_record = _init_record(init)  # hashed and read once, not at every epoch

    def save(history, training_state):
        last = history[-1]
        meta = {"training": {"command": command, "config": asdict(cfg), "epochs_done": last.epoch,
                             "init": init_record,
                             "seconds": round(sum(r.seconds for r in history), 1),
                             "history": [asdict(r) for r in history]},
                "test_accuracy": last.test_accuracy}
        ckpt = Checkpoint(model=model, arch=arch, classes=train.classes, meta=meta)
        done = last.epoch >= cfg.epochs
        save_checkpoint(out, ckpt, None if done else {**training_state, "settings": run_settings})
        if done:
            write_training_record(out, meta)

    return fit(model, train, test, cfg, save=save, state=state, log=log, rank=rank, world_size=world_size)


def _init_record(init) -> dict | None:
    """Where a warm-started run came from: the file's hash and its own training record."""
    if init is None:
        return None
    from .checkpoints import read_payload
    from .io import sha256_of
    return {"path": str(init), "sha256": sha256_of(init),
            "training": {k: v for k, v in read_payload(init).get("meta", {}).get("training", {}).items()
                         if k != "history"}}


def write_training_record(checkpoint, meta: dict) -> dict:
    """A small JSON beside a trained checkpoint: command, epochs, wall time, test accuracy."""
    from pathlib import Path

    from .io import write_json

    training = meta["training"]
    record = {"checkpoint": Path(checkpoint).name, "command": training["command"],
              "epochs": training["epochs_done"], "train_seconds": training["seconds"],
              "test_accuracy": meta["test_accuracy"], "config": training["config"],
              "init": training.get("init"),
              "per_epoch": [{k: r[k] for k in ("epoch", "loss", "train_accuracy", "test_accuracy", "seconds")}
                            for r in training["history"]]}
    write_json(Path(checkpoint).with_suffix(".json"), record)
    return record
