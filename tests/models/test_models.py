"""PSPNet: the authors' key layout, checkpoint loading, forward at any size, training outputs and the aux loss."""
import pytest
import torch

from pspnet_fast.models import PSPNet, ResNet, load_backbone_weights, load_checkpoint, pspnet_loss


def _bn(prefix, c):
    return {f"{prefix}.{k}": ((c,) if k != "num_batches_tracked" else ()) for k in
            ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}


def authors_pspnet50_layout(classes: int) -> dict:
    """Key -> shape of the authors' PSPNet-50 (hszhao/semseg), written from PEERS.md section 2 alone."""
    keys = {"layer0.0.weight": (64, 3, 3, 3), "layer0.3.weight": (64, 64, 3, 3), "layer0.6.weight": (128, 64, 3, 3)}
    keys.update(_bn("layer0.1", 64))
    keys.update(_bn("layer0.4", 64))
    keys.update(_bn("layer0.7", 128))
    inplanes = 128
    for li, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for b in range(blocks):
            p = f"layer{li}.{b}"
            keys[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            keys.update(_bn(f"{p}.bn1", planes))
            keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            keys.update(_bn(f"{p}.bn2", planes))
            keys[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            keys.update(_bn(f"{p}.bn3", planes * 4))
            if b == 0:
                keys[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                keys.update(_bn(f"{p}.downsample.1", planes * 4))
            inplanes = planes * 4
    for i in range(4):
        keys[f"ppm.features.{i}.1.weight"] = (512, 2048, 1, 1)
        keys.update(_bn(f"ppm.features.{i}.2", 512))
    keys["cls.0.weight"] = (512, 4096, 3, 3)
    keys.update(_bn("cls.1", 512))
    keys["cls.4.weight"], keys["cls.4.bias"] = (classes, 512, 1, 1), (classes,)
    keys["aux.0.weight"] = (256, 1024, 3, 3)
    keys.update(_bn("aux.1", 256))
    keys["aux.4.weight"], keys["aux.4.bias"] = (classes, 256, 1, 1), (classes,)
    return keys


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PSPNet(50, num_classes=7)


def test_state_dict_is_the_authors(model):
    layout = authors_pspnet50_layout(7)
    sd = model.state_dict()
    assert len(sd) == 370 == len(layout)
    assert set(sd) == set(layout)
    for k, shape in layout.items():
        assert tuple(sd[k].shape) == shape, k


@pytest.mark.parametrize("wrap", ["plain", "state_dict_module"])
def test_authors_checkpoint_loads_strictly(model, tmp_path, wrap):
    torch.manual_seed(1)
    sd = {}
    for k, shape in authors_pspnet50_layout(7).items():
        sd[k] = torch.tensor(3) if k.endswith("num_batches_tracked") else torch.randn(shape)
    if wrap == "state_dict_module":
        obj = {"epoch": 5, "state_dict": {"module." + k: v for k, v in sd.items()}, "optimizer": {}}
    else:
        obj = sd
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    m = PSPNet(50, num_classes=7)
    load_checkpoint(m, path)
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_checkpoint_mismatch_names_the_keys(tmp_path):
    m = PSPNet(50, num_classes=3)
    sd = m.state_dict()
    sd.pop("cls.4.bias")
    sd["cls.9.weight"] = torch.zeros(1)
    sd["aux.4.weight"] = torch.zeros(5, 256, 1, 1)
    torch.save({"state_dict": sd}, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError) as e:
        load_checkpoint(m, tmp_path / "bad.pth")
    msg = str(e.value)
    assert "cls.4.bias" in msg and "cls.9.weight" in msg and "aux.4.weight" in msg
    with pytest.raises(FileNotFoundError):
        load_checkpoint(m, tmp_path / "missing.pth")


@pytest.mark.parametrize("hw", [(33, 33), (50, 67), (64, 40), (17, 9)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_eval_logits_at_input_size(model, hw):
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *hw))
    assert out.shape == (1, 7, *hw)
    assert torch.isfinite(out).all()


def test_fused_and_reference_models_agree(model):
    ref = PSPNet(50, num_classes=7, fused=False)
    ref.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    ref.eval()
    x = torch.randn(1, 3, 41, 57)
    with torch.no_grad():
        a, b = model(x), ref(x)
    assert (a - b).abs().max().item() <= 1e-4 * b.abs().max().item()


def test_training_outputs_and_aux_loss(model):
    model.train()
    x = torch.randn(2, 3, 41, 35)
    y = torch.randint(0, 7, (2, 41, 35))
    y[0, :5] = 255
    main, aux = model(x)
    assert main.shape == aux.shape == (2, 7, 41, 35)
    loss = pspnet_loss(main, aux, y)
    ce = torch.nn.CrossEntropyLoss(ignore_index=255)
    torch.testing.assert_close(loss, ce(main, y) + 0.4 * ce(aux, y))
    loss.backward()
    assert model.ppm.features[0][1].weight.grad is not None
    assert model.aux[0].weight.grad is not None
    pred, main_loss, aux_loss = model(x, y)
    assert pred.shape == (2, 41, 35) and pred.dtype == torch.int64
    assert main_loss.dim() == 0 and aux_loss.dim() == 0
    model.zero_grad(set_to_none=True)


def test_zoom_factor_and_no_ppm():
    m = PSPNet(50, num_classes=4, zoom_factor=1, use_ppm=False).eval()
    assert not hasattr(m, "ppm") or m.ppm is None
    assert m.cls[0].weight.shape[1] == 2048
    with torch.no_grad():
        out = m(torch.randn(1, 3, 33, 41))
    assert out.shape == (1, 4, 5, 6)


def test_backbone_weights_load_from_local_file(tmp_path):
    torch.manual_seed(2)
    backbone = ResNet(50, deep_base=True, num_classes=1000)
    sd = backbone.state_dict()
    assert "conv1.weight" in sd and "layer4.2.bn3.running_var" in sd and "fc.weight" in sd
    torch.save(sd, tmp_path / "resnet50.pth")
    m = PSPNet(50, num_classes=3)
    load_backbone_weights(m, tmp_path / "resnet50.pth")
    assert torch.equal(m.layer0[0].weight, sd["conv1.weight"])
    assert torch.equal(m.layer0[7].running_mean, sd["bn3.running_mean"])
    assert torch.equal(m.layer3[5].conv2.weight, sd["layer3.5.conv2.weight"])
    plain = ResNet(50, deep_base=False).state_dict()
    torch.save(plain, tmp_path / "tv.pth")
    with pytest.raises(RuntimeError, match="shape of layer0.0.weight"):
        load_backbone_weights(m, tmp_path / "tv.pth")
    m7 = PSPNet(50, num_classes=3, deep_base=False)
    load_backbone_weights(m7, tmp_path / "tv.pth")


def test_dilation_gives_output_stride_8():
    m = PSPNet(50, num_classes=3)
    assert m.layer3[3].conv2.dilation == (2, 2) and m.layer3[3].conv2.padding == (2, 2)
    assert m.layer4[0].conv2.dilation == (4, 4) and m.layer4[0].conv2.stride == (1, 1)
    assert m.layer4[0].downsample[0].stride == (1, 1)
    with torch.no_grad():
        f = m.layer4(m.layer3(m.layer2(m.layer1(m.layer0(torch.randn(1, 3, 65, 65))))))
    assert f.shape[-2:] == (9, 9)  # (65 - 1) / 8 + 1, as 473 -> 60
