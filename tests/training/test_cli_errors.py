"""Every `pspnet-fast` subcommand turns expected errors (missing or bad files, bad arguments, out-of-range values) into
one `error: ...` line on stderr and exit status 2, no traceback; `--debug` shows the traceback (issue 14 finding 10).
In-process (cli.main): a fresh `python -m pspnet_fast.cli` costs ~25 s of imports here."""
import pytest
import torch

from pspnet_fast import cli


def _one_error_line(capsys, code, cmd):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) >= 1 and "error:" in lines[-1] and lines[-1].startswith(f"pspnet-fast {cmd}"), err
    return lines[-1]


@pytest.fixture
def files(tmp_path):
    tensor, garbage, empty = tmp_path / "tensor.pth", tmp_path / "garbage.pth", tmp_path / "empty.pth"
    torch.save(torch.zeros(3), tensor)
    garbage.write_bytes(b"\x00\x01not a checkpoint" * 10)
    empty.write_bytes(b"")
    return tmp_path, tensor, garbage, empty


def test_convert_errors(files, capsys):
    tmp, tensor, garbage, empty = files
    ok_src = tmp / "ok.pth"
    torch.save({"state_dict": {"cls.4.weight": torch.zeros(2, 3, 1, 1)}}, ok_src)
    cases = [
        ([str(tmp / "missing.pth"), str(tmp / "o.pth")], "does not exist"),
        ([str(tensor), str(tmp / "o.pth")], "holds a Tensor"),
        ([str(tmp), str(tmp / "o.pth")], "is a folder"),
        ([str(garbage), str(tmp / "o.pth")], "is not a torch checkpoint"),
        ([str(empty), str(tmp / "o.pth")], "is empty"),
        ([str(ok_src), str(tmp / "no" / "such" / "o.pth")], "destination folder"),
        ([str(ok_src), str(tmp)], "is a folder"),
    ]
    for args, text in cases:
        line = _one_error_line(capsys, cli.main(["convert", *args, "--from", "authors"]), "convert")
        assert text in line, (args, line)
    with pytest.raises(ValueError):  # --debug: the exception itself
        cli.main(["convert", str(tensor), str(tmp / "o.pth"), "--from", "authors", "--debug"])


def test_eval_errors(files, capsys):
    tmp, tensor, garbage, _ = files
    assert "does not exist" in _one_error_line(capsys, cli.main(["eval", str(tmp / "missing.pth")]), "eval")
    assert "is not a torch checkpoint" in _one_error_line(capsys, cli.main(["eval", str(garbage)]), "eval")
    with pytest.raises(FileNotFoundError):
        cli.main(["eval", str(tmp / "missing.pth"), "--debug"])


@pytest.mark.parametrize("cmd,args", [
    ("train", ["--batch-size", "0"]), ("train", ["--crop", "0"]), ("train", ["--epochs", "-1"]),
    ("train", ["--base-lr", "0"]), ("train", ["--workers", "-2"]), ("train", ["--dropout", "1.5"]),
    ("train", ["--synthetic-size", "0"]), ("train", ["--batch-size", "two"]),
    ("eval", ["x.pth", "--crop", "0"]), ("eval", ["x.pth", "--scales", "0"]), ("eval", ["x.pth", "--limit", "0"]),
    ("eval", ["x.pth", "--base-size", "-5"]),
])
def test_out_of_range_arguments_are_refused_by_the_parser(cmd, args, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([cmd, *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: argument" in err and "Traceback" not in err, err


def test_train_resume_of_a_bad_file(files, capsys):
    tmp, _, garbage, _ = files
    code = cli.main(["train", "--resume", str(garbage), "--epochs", "1", "--synthetic-train", "2",
                     "--synthetic-val", "1", "--synthetic-size", "32", "--layers", "18", "--width", "4",
                     "--batch-size", "2", "--workers", "0", "--no-progress", "--device", "cpu"])
    assert "is not a torch checkpoint" in _one_error_line(capsys, code, "train")

