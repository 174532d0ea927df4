"""`pspnet-fast train`: the PSPNet authors' training recipe (hszhao/semseg `tool/train.py`), on one process or many.

Recipe: SGD (momentum 0.9, weight decay 1e-4), poly learning rate lr = base_lr * (1 - it / max_it) ** 0.9 set before
every iteration, the heads (ppm, cls, aux) at 10x the backbone's rate, loss = CE(main) + 0.4 * CE(aux) with
ignore_index 255. Checkpoints in the authors' layout {'epoch', 'state_dict' (keys prefixed `module.`), 'optimizer'}
(plus 'config', the model and data settings), written to a temporary file and renamed, by rank 0 only.

Many processes (torchrun): DistributedDataParallel, a DistributedSampler, the per-process batch = batch_size /
world_size. On CUDA: nccl and torch.nn.SyncBatchNorm. On CPU: gloo and `CPUSyncBatchNorm` (below), because
torch's SyncBatchNorm refuses CPU tensors. Both give the statistics of the combined batch. Mixed precision
(autocast, bfloat16 where supported, else float16 with a GradScaler) on CUDA only.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from .._checks import (nonnegative_float_arg, nonnegative_int_arg, positive_float_arg, positive_int_arg,
                       probability_arg)
from ..models import load_backbone_weights, load_checkpoint
from ..models.pspnet import read_checkpoint
from .builders import build_model, make_source
from .data import IGNORE_INDEX, Augment, SegDataset
from .evaluate import evaluate
from .metrics import format_table

__all__ = ["CPUSyncBatchNorm", "convert_sync_batchnorm", "build_model", "make_source", "param_groups", "poly_lr",
           "set_lr", "train_step", "save_checkpoint", "train", "main"]

HEADS = ("ppm", "cls", "aux")
BACKBONE = ("layer0", "layer1", "layer2", "layer3", "layer4")


# ---------------------------------------------------------------------------------------------------------------
# Synchronized BatchNorm for CPU processes (gloo)


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the batch combined over all processes of the default
    group: mean = all_reduce(sum x) / all_reduce(count), var = all_reduce(sum (x - mean)^2) / count (two passes, as
    precise as one process's BatchNorm), both reductions differentiable (torch.distributed.nn.functional.all_reduce),
    running_var updated with the unbiased variance, as BatchNorm2d does. Without a process group, or in eval, it is
    BatchNorm2d. x: (N, C, H, W), float32/float64, any device gloo serves (CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        # Imported here: torch.distributed.nn pulls in the RPC frontend, which fails to import on torch builds
        # without distributed support, and only a multi-process CPU run gets here.
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xf = x.transpose(0, 1).reshape(c, -1)  # (C, N*H*W)
        local = torch.cat([xf.sum(1), xf.new_full((1,), float(xf.shape[1]))])
        tot = all_reduce(local)
        count = tot[c]
        if float(count) <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(count)} over all "
                             "processes")
        mean = tot[:c] / count
        var = all_reduce(((xf - mean[:, None]) ** 2).sum(1)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (count / (count - 1)), alpha=m)
        y = (x - mean.view(1, c, 1, 1)) * torch.rsqrt(var.view(1, c, 1, 1) + self.eps)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y


def convert_sync_batchnorm(module: nn.Module, cuda: bool) -> nn.Module:
    """Every BatchNorm2d -> torch.nn.SyncBatchNorm (cuda=True) or CPUSyncBatchNorm (cuda=False), weights and
    running statistics kept."""
    if cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, CPUSyncBatchNorm):
        out = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        out.load_state_dict(module.state_dict())
        out.train(module.training)
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child, cuda)
        if new is not child:
            setattr(out, name, new)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Model, data, schedule


def param_groups(model: nn.Module, base_lr: float, head_mult: float = 10.0) -> list[dict]:
    """[backbone (layer0..layer4) at base_lr, heads (ppm, cls, aux) at head_mult * base_lr]."""
    core = model.module if hasattr(model, "module") else model
    backbone = [p for n in BACKBONE for p in getattr(core, n).parameters()]
    heads = [p for n in HEADS if hasattr(core, n) for p in getattr(core, n).parameters()]
    return [{"params": backbone, "lr": base_lr, "lr_mult": 1.0}, {"params": heads, "lr": base_lr * head_mult,
                                                                   "lr_mult": head_mult}]


def poly_lr(base_lr: float, it: int, max_it: int, power: float = 0.9) -> float:
    return base_lr * (1 - it / max_it) ** power


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)


def train_step(model, optimizer, images, labels, aux_weight: float = 0.4, scaler=None, amp_dtype=None):
    """One SGD step on (images (N, 3, H, W), labels (N, H, W) int64). -> (loss, main_loss, aux_loss) detached."""
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        main, aux = model(images)
        main_loss = F.cross_entropy(main.float(), labels, ignore_index=IGNORE_INDEX)
        aux_loss = F.cross_entropy(aux.float(), labels, ignore_index=IGNORE_INDEX)
        loss = main_loss + aux_weight * aux_loss
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach(), main_loss.detach(), aux_loss.detach()


def save_checkpoint(obj: dict, path) -> None:
    """torch.save to path + '.tmp', then os.replace: an existing checkpoint is never left half-written."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class Progress:
    """A one-line progress bar (redrawn on a terminal, a line every ~10% otherwise)."""

    def __init__(self, total: int, prefix: str, stream=sys.stderr, enabled: bool = True):
        self.total, self.prefix, self.stream, self.enabled = total, prefix, stream, enabled
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.every = max(total // 10, 1)

    def update(self, n: int, text: str) -> None:
        if not self.enabled:
            return
        done = int(20 * n / self.total)
        line = f"{self.prefix} [{'#' * done}{'.' * (20 - done)}] {n}/{self.total} {text}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if n == self.total else ""))
            self.stream.flush()
        elif n % self.every == 0 or n == self.total:
            self.stream.write(line + "\n")
            self.stream.flush()


# ---------------------------------------------------------------------------------------------------------------
# The training loop


def _dist_env() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def train(cfg: dict, log=print) -> dict:
    """Trains per cfg (the parsed arguments as a dict). Returns {'miou': ..., 'summary': ..., 'epochs': ...,
    'seconds': ...} of the last validation (miou None without validation data)."""
    rank, world, local_rank = _dist_env()
    device = torch.device(cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    is_main = rank == 0
    say = log if is_main else (lambda *a, **k: None)
    try:
        source = make_source(cfg["data"], "train", cfg, cfg.get("data_root"))
        if cfg["data"] == "synthetic":
            cfg["num_classes"] = source.num_classes
        k = cfg["num_classes"]
        val_source = None
        if cfg["data"] == "synthetic":
            val_source = make_source("synthetic", "val", cfg)
        elif cfg.get("val_list"):
            val_source = make_source(cfg["val_list"], "val", cfg, cfg.get("data_root"))
        crop = tuple(cfg["crop"])
        aug = Augment(crop, scale=tuple(cfg["scale"]), rotate=(-cfg["rotate"], cfg["rotate"]))
        train_set = SegDataset(source, aug, seed=cfg["seed"])
        if cfg["batch_size"] % world:
            raise ValueError(f"--batch-size {cfg['batch_size']} is not divisible by the {world} processes")
        per_proc = cfg["batch_size"] // world
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg["seed"],
                                     drop_last=True)
        iters_per_epoch = len(sampler) // per_proc
        if iters_per_epoch < 1:
            raise ValueError(f"{len(train_set)} training images give no full batch of {cfg['batch_size']}")
        max_it = cfg["epochs"] * iters_per_epoch

        torch.manual_seed(cfg["seed"])
        model = build_model(cfg["layers"], k, cfg["width"], cfg["use_ppm"], cfg["fused"], cfg["dropout"])
        if cfg.get("backbone_weights"):
            load_backbone_weights(model, cfg["backbone_weights"])
        model.to(device)
        optimizer = torch.optim.SGD(param_groups(model, cfg["base_lr"]), lr=cfg["base_lr"], momentum=cfg["momentum"],
                                    weight_decay=cfg["weight_decay"])
        start_epoch = 0
        if cfg.get("resume"):
            ckpt = read_checkpoint(cfg["resume"])
            if not isinstance(ckpt, dict) or not {"epoch", "state_dict", "optimizer"} <= set(ckpt):
                raise ValueError(f"--resume {cfg['resume']}: expected {{'epoch', 'state_dict', 'optimizer'}}")
            load_checkpoint(model, cfg["resume"])
            optimizer.load_state_dict(ckpt["optimizer"])
            start_epoch = int(ckpt["epoch"])
            say(f"resumed from {cfg['resume']} at epoch {start_epoch}")
        core = model
        if world > 1:
            model = convert_sync_batchnorm(model, device.type == "cuda").to(device)
            core = model
            model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        amp_dtype, scaler = None, None
        if device.type == "cuda" and cfg.get("amp", True):
            amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            if amp_dtype == torch.float16:
                scaler = torch.amp.GradScaler("cuda")
        say(f"training {type(core).__name__}-{cfg['layers']} (width {cfg['width']}, "
            f"ppm {'on' if cfg['use_ppm'] else 'off'}, "
            f"{'fused' if cfg['fused'] else 'reference'} PPM) on {len(train_set)} images, {world} process(es) on "
            f"{device}, batch {cfg['batch_size']}, {cfg['epochs']} epochs x {iters_per_epoch} iterations, "
            f"crop {crop[0]}x{crop[1]}" + (f", autocast {amp_dtype}" if amp_dtype else ""))

        t_start = time.time()
        result = {"miou": None, "summary": None}
        for epoch in range(start_epoch, cfg["epochs"]):
            # Everything random in an epoch is seeded by (seed, epoch): a resumed run repeats the uninterrupted one.
            torch.manual_seed(cfg["seed"] * 1_000_003 + epoch * 101 + rank)
            sampler.set_epoch(epoch)
            train_set.set_epoch(epoch)
            loader = DataLoader(train_set, batch_size=per_proc, sampler=sampler, num_workers=cfg["workers"],
                                drop_last=True, pin_memory=device.type == "cuda")
            model.train()
            bar = Progress(iters_per_epoch, f"epoch {epoch + 1}/{cfg['epochs']}", enabled=is_main and cfg["progress"])
            t0, seen, avg = time.time(), 0, None
            for i, (images, labels) in enumerate(loader):
                it = epoch * iters_per_epoch + i
                lr = poly_lr(cfg["base_lr"], it, max_it, cfg["power"])
                set_lr(optimizer, lr)
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                loss, _, _ = train_step(model, optimizer, images, labels, cfg["aux_weight"], scaler, amp_dtype)
                value = float(loss)
                if not math.isfinite(value):
                    raise FloatingPointError(f"loss is {value} at epoch {epoch + 1}, iteration {i + 1}")
                avg = value if avg is None else 0.9 * avg + 0.1 * value
                seen += images.shape[0] * world
                bar.update(i + 1, f"loss {avg:.4f} lr {lr:.5f} {seen / (time.time() - t0):.1f} img/s")
            epoch_s = time.time() - t0
            say(f"epoch {epoch + 1}/{cfg['epochs']}: loss {avg:.4f}, {epoch_s:.1f}s, {seen / epoch_s:.1f} img/s")
            last = epoch + 1 == cfg["epochs"]
            if is_main and cfg.get("save_dir") and (last or (epoch + 1) % cfg["save_every"] == 0):
                path = os.path.join(cfg["save_dir"], f"train_epoch_{epoch + 1}.pth")
                state = {f"module.{k}": v for k, v in core.state_dict().items()}
                save_checkpoint({"epoch": epoch + 1, "state_dict": state, "optimizer": optimizer.state_dict(),
                                 "config": _ckpt_config(cfg)}, path)
                say(f"saved {path}")
            if val_source is not None and (last or (cfg["val_every"] and (epoch + 1) % cfg["val_every"] == 0)):
                tv = time.time()
                summary = evaluate(core, SegDataset(val_source), k, crop, flip=True, device=device, rank=rank,
                                   world=world)
                result = {"miou": summary["miou"], "summary": summary}
                say(f"validation after epoch {epoch + 1}: mIoU {100 * summary['miou']:.2f} mAcc "
                    f"{100 * summary['macc']:.2f} allAcc {100 * summary['allacc']:.2f} ({time.time() - tv:.1f}s)")
        result["seconds"] = time.time() - t_start
        result["epochs"] = cfg["epochs"]
        if result["summary"] is not None:
            say(format_table(result["summary"], list(getattr(val_source, "classes", [])) or None))
            say(f"final mIoU {100 * result['miou']:.2f} after {cfg['epochs']} epochs, "
                f"training+validation {result['seconds']:.1f}s")
        result["model"] = core
        return result
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _ckpt_config(cfg: dict) -> dict:
    keys = ("layers", "width", "num_classes", "use_ppm", "crop", "seed", "synthetic_size", "synthetic_train",
            "synthetic_val", "data")
    return {k: (list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k]) for k in keys if k in cfg}


# README ("The embedded task") has the measured runs: 90 s with the PPM, 86 s without, on the 2 idle CPU cores.
SYNTHETIC_DEFAULTS = dict(layers=18, width=8, batch_size=16, epochs=4, synthetic_size=128, synthetic_train=1024,
                          synthetic_val=128, scale=(0.75, 1.0), base_lr=0.01, workers=1)
LIST_DEFAULTS = dict(layers=50, width=64, batch_size=16, epochs=50, crop=(473, 473), scale=(0.5, 2.0), base_lr=0.01,
                     workers=2)


def build_parser(prog="pspnet-fast train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], epilog=(
        "Defaults with --data synthetic: " + ", ".join(f"{k}={v}" for k, v in SYNTHETIC_DEFAULTS.items())
        + "; with a list file: " + ", ".join(f"{k}={v}" for k, v in LIST_DEFAULTS.items())
        + ". Many processes: torchrun --nproc_per_node N -m pspnet_fast.cli train ..."))
    p.add_argument("--data", default="synthetic", help="'synthetic' (default) or an authors'-format list file")
    p.add_argument("--data-root", default=None, help="root the list's paths are relative to (default: its folder)")
    p.add_argument("--val-list", default=None, help="validation list (list data)")
    p.add_argument("--num-classes", type=positive_int_arg, default=None, help="classes (list data)")
    p.add_argument("--layers", type=positive_int_arg, default=None, help="ResNet depth: 18, 34 (BasicBlock) or 50, 101, 152")
    p.add_argument("--width", type=positive_int_arg, default=None, help="ResNet-18/34 base width (64 = torchvision's)")
    p.add_argument("--ppm", dest="use_ppm", action=argparse.BooleanOptionalAction, default=True,
                   help="the pyramid pooling module (--no-ppm: cls on the backbone's map, to measure the pyramid)")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="fused PPM kernels (default) or the pure-PyTorch reference")
    p.add_argument("--dropout", type=probability_arg, default=0.1)
    p.add_argument("--crop", type=positive_int_arg, nargs="+", default=None, help="crop H [W]")
    p.add_argument("--scale", type=positive_float_arg, nargs=2, default=None, metavar=("MIN", "MAX"), help="random scale range")
    p.add_argument("--rotate", type=nonnegative_float_arg, default=10.0, help="rotation range +-degrees")
    p.add_argument("--batch-size", type=positive_int_arg, default=None, help="total over all processes")
    p.add_argument("--epochs", type=positive_int_arg, default=None)
    p.add_argument("--base-lr", type=positive_float_arg, default=None)
    p.add_argument("--momentum", type=probability_arg, default=0.9)
    p.add_argument("--weight-decay", type=nonnegative_float_arg, default=1e-4)
    p.add_argument("--power", type=nonnegative_float_arg, default=0.9, help="poly learning-rate power")
    p.add_argument("--aux-weight", type=nonnegative_float_arg, default=0.4)
    p.add_argument("--workers", type=nonnegative_int_arg, default=None, help="DataLoader workers per process")
    p.add_argument("--save-dir", default=None, help="checkpoints train_epoch_N.pth go here")
    p.add_argument("--save-every", type=positive_int_arg, default=1, help="checkpoint every N epochs (and the last)")
    p.add_argument("--val-every", type=nonnegative_int_arg, default=None, help="validate every N epochs (and after the last); 0: "
                                                               "last only (default: 2 synthetic, 0 list data)")
    p.add_argument("--resume", default=None, help="a checkpoint {'epoch', 'state_dict', 'optimizer'} to continue")
    p.add_argument("--backbone-weights", default=None, help="ImageNet ResNet weights from a local file")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="autocast on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--synthetic-size", type=positive_int_arg, default=None)
    p.add_argument("--synthetic-train", type=positive_int_arg, default=None, help="synthetic training images")
    p.add_argument("--synthetic-val", type=positive_int_arg, default=None, help="synthetic validation images")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def config_from_args(argv=None, prog="pspnet-fast train") -> dict:
    args = build_parser(prog).parse_args(argv)
    cfg = vars(args)
    defaults = SYNTHETIC_DEFAULTS if args.data == "synthetic" else LIST_DEFAULTS
    for k, v in defaults.items():
        if cfg.get(k) is None:
            cfg[k] = v
    if args.data == "synthetic":
        cfg["crop"] = cfg["crop"] or (cfg["synthetic_size"], cfg["synthetic_size"])
        cfg["val_every"] = 2 if cfg["val_every"] is None else cfg["val_every"]
    else:
        cfg["val_every"] = cfg["val_every"] or 0
    cfg["crop"] = (cfg["crop"][0], cfg["crop"][-1])
    return cfg


def main(argv=None, prog="pspnet-fast train") -> int:
    cfg = config_from_args(argv, prog)
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
