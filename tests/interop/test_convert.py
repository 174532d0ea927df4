"""pspnet-fast convert: authors' and mmsegmentation checkpoints (key names of PEERS.md sections 2-3) rewritten to
PSPNet's layout load strictly and give the same outputs; what cannot be converted is refused."""
import re

import pytest
import torch

from pspnet_fast import cli
from pspnet_fast.interop.convert import ConversionError, convert_state_dict
from pspnet_fast.models import PSPNet, load_checkpoint

from . import lookalikes as la


@pytest.fixture(scope="module")
def net():
    """A PSPNet-50 with torchvision's stem and mmseg's align_corners=False; BatchNorm statistics randomized."""
    torch.manual_seed(0)
    return la.randomize_bn(PSPNet(50, num_classes=3, deep_base=False, align_corners=False)).eval()


@pytest.fixture(scope="module")
def target():
    """One PSPNet of the same configuration that each test loads a converted checkpoint into (strict)."""
    return PSPNet(50, num_classes=3, deep_base=False, align_corners=False).eval()


def _to_mmseg(sd):
    """PSPNet keys -> mmsegmentation's (written from PEERS.md section 3, independently of pspnet_fast.convert)."""
    out = {}
    for k, v in sd.items():
        for pat, rep in [(r"layer0\.0\.(.*)", r"backbone.conv1.\1"), (r"layer0\.1\.(.*)", r"backbone.bn1.\1"),
                         (r"(layer[1-4]\..*)", r"backbone.\1"),
                         (r"ppm\.features\.(\d+)\.1\.(.*)", r"decode_head.psp_modules.\1.1.conv.\2"),
                         (r"ppm\.features\.(\d+)\.2\.(.*)", r"decode_head.psp_modules.\1.1.bn.\2"),
                         (r"cls\.0\.(.*)", r"decode_head.bottleneck.conv.\1"),
                         (r"cls\.1\.(.*)", r"decode_head.bottleneck.bn.\1"),
                         (r"cls\.4\.(.*)", r"decode_head.conv_seg.\1"),
                         (r"aux\.0\.(.*)", r"auxiliary_head.convs.0.conv.\1"),
                         (r"aux\.1\.(.*)", r"auxiliary_head.convs.0.bn.\1"),
                         (r"aux\.4\.(.*)", r"auxiliary_head.conv_seg.\1")]:
            if re.fullmatch(pat, k):
                out[re.sub(pat, rep, k)] = v
                break
        else:
            raise AssertionError(k)
    return out


def test_authors_round_trip(net, target, tmp_path, capsys):
    src = tmp_path / "authors.pth"
    torch.save({"epoch": 50, "state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, src)
    assert cli.main(["convert", str(src), str(tmp_path / "out.pth"), "--from", "authors"]) == 0
    assert "layers=50, num_classes=3, deep_base=False" in capsys.readouterr().out
    meta = torch.load(tmp_path / "out.pth", weights_only=True)["pspnet_fast"]
    assert meta["levels"] == 4 and meta["align_corners"]
    model = load_checkpoint(target, tmp_path / "out.pth")
    x = torch.randn(1, 3, 17, 19)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), rtol=0, atol=0)


def test_mmseg_round_trip(net, target):
    for p in target.parameters():
        p.data.zero_()
    target.load_state_dict(convert_state_dict(_to_mmseg(net.state_dict()), "mmseg", no_contract_dilation=True),
                           strict=True)
    x = torch.randn(1, 3, 17, 19)
    with torch.no_grad():
        torch.testing.assert_close(target(x), net(x), rtol=0, atol=0)


def test_mmseg_cli(tmp_path, capsys):
    """The command line on a small mmseg-keyed file: the backbone's contract_dilation is not in the checkpoint, so
    a backbone is refused until the caller asserts it; --head-only converts the rest."""
    mm = {"backbone.conv1.weight": torch.zeros(64, 3, 7, 7), "decode_head.conv_seg.weight": torch.ones(3, 512, 1, 1),
          "decode_head.psp_modules.0.1.conv.weight": torch.ones(512, 2048, 1, 1),
          "decode_head.psp_modules.0.1.bn.running_var": torch.ones(512)}
    src, dst = tmp_path / "mmseg.pth", str(tmp_path / "out.pth")
    torch.save({"meta": {"epoch": 1}, "state_dict": mm}, src)
    assert cli.main(["convert", str(src), dst, "--from", "mmseg"]) == 2
    assert "--no-contract-dilation" in capsys.readouterr().err
    assert cli.main(["convert", str(src), dst, "--from", "mmseg", "--head-only"]) == 0
    assert "align_corners=False" in capsys.readouterr().out
    out = torch.load(dst, weights_only=True)
    assert sorted(out["state_dict"]) == ["cls.4.weight", "ppm.features.0.1.weight", "ppm.features.0.2.running_var"]
    assert out["pspnet_fast"]["from"] == "mmseg" and out["pspnet_fast"]["num_classes"] == 3


def test_mmseg_head_semantics(net, target):
    """The mapped PPM + cls compute what an mmseg PSPHead with the original keys computes."""
    mm = _to_mmseg(net.state_dict())
    head = la.PSPHead(in_channels=2048, channels=512, num_classes=3, in_index=0, align_corners=False).eval()
    head.load_state_dict({k[len("decode_head."):]: v for k, v in mm.items() if k.startswith("decode_head.")},
                         strict=True)
    model = target
    model.load_state_dict(convert_state_dict(mm, "mmseg", no_contract_dilation=True), strict=True)
    f = torch.randn(1, 2048, 5, 6)
    with torch.no_grad():
        expect = head([f])
        torch.testing.assert_close(model.cls(model.ppm(f)), expect, rtol=1e-5, atol=1e-5 * expect.abs().max().item())


def test_refusals(net, target):
    mm = _to_mmseg(net.state_dict())
    v1c = {k: v for k, v in mm.items() if not k.startswith("backbone.conv1") and not k.startswith("backbone.bn1")}
    v1c.update({"backbone.stem.0.weight": torch.zeros(32, 3, 3, 3), "backbone.stem.1.weight": torch.ones(32)})
    with pytest.raises(ConversionError, match="ResNetV1c"):
        convert_state_dict(v1c, "mmseg", no_contract_dilation=True)
    heads = convert_state_dict(v1c, "mmseg", head_only=True)
    assert heads and all(k.split(".")[0] in ("ppm", "cls", "aux") for k in heads)
    missing, unexpected = target.load_state_dict(heads, strict=False)
    assert not unexpected and all(k.startswith("layer") for k in missing)
    with pytest.raises(ConversionError, match="no mapping"):
        convert_state_dict({**mm, "decode_head.extra.weight": torch.zeros(1)}, "mmseg", no_contract_dilation=True)
    with pytest.raises(ConversionError, match="outside"):
        convert_state_dict({"backbone.conv1.weight": torch.zeros(1)}, "authors")
    with pytest.raises(ValueError, match="source"):
        convert_state_dict({}, "smp")
