"""Training: the loss goes down, resume continues the schedule exactly, bad data stops the run without touching
an existing checkpoint, the CLI trains and evaluates, and two gloo processes equal one process on the combined batch."""
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from pspnet_fast import cli
from pspnet_fast.training.train import (build_model, config_from_args, param_groups, poly_lr, save_checkpoint, set_lr, train,
                               train_step)

TINY = ["--layers", "18", "--width", "4", "--batch-size", "4", "--workers", "0", "--no-progress"]
SYN = TINY + ["--synthetic-size", "32", "--synthetic-train", "12", "--synthetic-val", "3"]


def _quiet(*a, **k):
    pass


def test_poly_lr_and_head_multiplier():
    model = build_model(18, 3, 4)
    opt = torch.optim.SGD(param_groups(model, 0.01), lr=0.01, momentum=0.9)
    set_lr(opt, poly_lr(0.01, 5, 10, 0.9))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 ** 0.9)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * 0.5 ** 0.9)
    n_heads = sum(p.numel() for n in ("ppm", "cls", "aux") for p in getattr(model, n).parameters())
    assert sum(p.numel() for p in opt.param_groups[1]["params"]) == n_heads
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    model = build_model(18, 3, 4, dropout=0.0).train()
    opt = torch.optim.SGD(param_groups(model, 0.01), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(4, 3, 32, 32)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    y[:, :2] = 255
    losses = [float(train_step(model, opt, x, y)[0]) for _ in range(8)]
    assert losses[-1] < 0.9 * losses[0] and losses[-1] < min(losses[:3]), losses


def _state(path):
    ck = torch.load(path, map_location="cpu", weights_only=True)
    assert set(ck) >= {"epoch", "state_dict", "optimizer"}
    assert all(k.startswith("module.") for k in ck["state_dict"])
    return ck


def test_resume_continues_the_schedule_exactly(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train(config_from_args(SYN + ["--epochs", "2", "--save-dir", str(a), "--val-every", "0"]), log=_quiet)
    train(config_from_args(SYN + ["--epochs", "2", "--save-dir", str(b), "--val-every", "0", "--resume",
                                  str(a / "train_epoch_1.pth")]), log=_quiet)
    assert not (b / "train_epoch_1.pth").exists()
    ca, cb = _state(a / "train_epoch_2.pth"), _state(b / "train_epoch_2.pth")
    assert ca["epoch"] == cb["epoch"] == 2
    for k, v in ca["state_dict"].items():
        assert torch.equal(v, cb["state_dict"][k]), k
    for s, t in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()):
        assert torch.equal(s["momentum_buffer"], t["momentum_buffer"])
    assert [g["lr"] for g in ca["optimizer"]["param_groups"]] == [g["lr"] for g in cb["optimizer"]["param_groups"]]


def test_cli_train_then_eval_writes_pngs(tmp_path, capsys):
    pytest.importorskip("PIL")
    assert cli.main(["train"] + SYN + ["--epochs", "1", "--save-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "final mIoU" in out and "boat" in out
    assert cli.main(["eval", str(tmp_path / "train_epoch_1.pth"), "--save-dir", str(tmp_path / "pred"),
                     "--scales", "0.75", "1.0"]) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "3 images" in out
    names = sorted(os.listdir(tmp_path / "pred"))
    assert "synthetic_val_00000.png" in names and "synthetic_val_00000_gt.png" in names
    assert "synthetic_val_00000_image.png" in names


def _list_data(root, n=4, size=32):
    from PIL import Image

    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"im{i}.png")
        Image.fromarray(rng.integers(0, 3, (size, size), dtype=np.uint8)).save(root / f"lb{i}.png")
        lines.append(f"im{i}.png lb{i}.png")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return root / "train.txt"


def test_bad_data_stops_without_corrupting_the_checkpoint(tmp_path):
    Image = pytest.importorskip("PIL.Image")

    lst = _list_data(tmp_path)
    args = TINY + ["--data", str(lst), "--num-classes", "3", "--crop", "32", "--save-dir", str(tmp_path / "ck")]
    train(config_from_args(args + ["--epochs", "1"]), log=_quiet)
    ck = tmp_path / "ck" / "train_epoch_1.pth"
    before = ck.read_bytes()
    bad = np.ones((32, 32), np.uint8)
    bad[0, 0] = 9
    Image.fromarray(bad).save(tmp_path / "lb2.png")
    cfg = config_from_args(args + ["--epochs", "2", "--resume", str(ck), "--workers", "1", "--save-every", "1"])
    with pytest.raises(ValueError, match=r"lb2\.png holds values \[9\] outside 0\.\.2"):
        train(cfg, log=_quiet)  # decoded in a DataLoader worker; the error names the file
    assert ck.read_bytes() == before
    assert sorted(os.listdir(tmp_path / "ck")) == ["train_epoch_1.pth"]


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.pth"
    save_checkpoint({"epoch": 1}, path)
    before = path.read_bytes()

    def broken_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"epoch": 2}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["c.pth"]


_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from torch import nn
    from pspnet_fast.training.train import build_model, convert_sync_batchnorm, param_groups, set_lr, train_step
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = build_model(18, 3, 4, dropout=0.0)
    model = convert_sync_batchnorm(model, cuda=False)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(param_groups(ddp, 0.01), lr=0.01, momentum=0.9, weight_decay=1e-4)
    data = torch.load(sys.argv[1])
    set_lr(opt, 0.01)
    train_step(ddp, opt, data["x"][2 * rank:2 * rank + 2], data["y"][2 * rank:2 * rank + 2])
    if rank == 0:
        torch.save(model.state_dict(), sys.argv[2])
    dist.destroy_process_group()
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one_process_on_the_combined_batch(tmp_path):
    torch.manual_seed(1)
    x = torch.randn(4, 3, 32, 32)
    y = torch.randint(0, 3, (4, 32, 32))  # no ignored pixels: both halves weigh the same in the mean
    torch.save({"x": x, "y": y}, tmp_path / "batch.pt")
    (tmp_path / "worker.py").write_text(_WORKER)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(tmp_path / "batch.pt"),
                                       str(tmp_path / "ddp.pt")], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    torch.manual_seed(0)
    model = build_model(18, 3, 4, dropout=0.0)
    opt = torch.optim.SGD(param_groups(model, 0.01), lr=0.01, momentum=0.9, weight_decay=1e-4)
    set_lr(opt, 0.01)
    train_step(model, opt, x, y)
    ddp = torch.load(tmp_path / "ddp.pt")
    one = model.state_dict()
    assert set(ddp) == set(one)
    moved = 0
    for k, v in one.items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=2e-5, msg=k)
        moved += int(k.endswith("running_mean"))
    assert moved > 10 and torch.equal(ddp["ppm.features.0.2.num_batches_tracked"], torch.tensor(1))
