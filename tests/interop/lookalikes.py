"""Look-alikes of the PSPNet modules users already run, with exactly the layouts and state_dict key names of
PEERS.md sections 2-4 (the authors' hszhao/semseg, mmsegmentation's PSPHead/PPM/ConvModule,
segmentation_models_pytorch's PSPModule). Written from those descriptions; mmcv, mmsegmentation and smp are not installed or imported."""
import torch
import torch.nn.functional as F
from torch import nn


def randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model


# --- the authors' (hszhao/semseg model/pspnet.py) ------------------------------------------------------------------
class AuthorsPPM(nn.Module):
    def __init__(self, in_dim, reduction_dim, bins, reductions=None):
        super().__init__()
        reductions = reductions or [reduction_dim] * len(bins)
        self.features = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_dim, r, kernel_size=1, bias=False),
                          nn.BatchNorm2d(r), nn.ReLU(inplace=True))
            for b, r in zip(bins, reductions))

    def forward(self, x):
        x_size = x.size()
        out = [x]
        for f in self.features:
            out.append(F.interpolate(f(x), x_size[2:], mode="bilinear", align_corners=True))
        return torch.cat(out, 1)


class AuthorsNet(nn.Module):
    """layer0 stand-in, ppm, cls (keys ppm.features.{i}.{1,2}, cls.{0,1,4})."""

    def __init__(self, c=16, bins=(1, 2, 3, 6), classes=5, reductions=None):
        super().__init__()
        self.layer0 = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        self.ppm = AuthorsPPM(c, c // len(bins), bins, reductions)
        out = c + sum(reductions or [c // len(bins)] * len(bins))
        self.cls = nn.Sequential(nn.Conv2d(out, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                                 nn.Dropout2d(p=0.1), nn.Conv2d(8, classes, kernel_size=1))

    def forward(self, x):
        return self.cls(self.ppm(self.layer0(x)))


# --- mmsegmentation (mmseg/models/decode_heads/psp_head.py, mmcv ConvModule) -----------------------------------------
class ConvModule(nn.Module):
    """mmcv's ConvModule with norm_cfg=BN, act_cfg=ReLU: children conv, bn, activate; bias='auto' (none with
    a norm)."""

    def __init__(self, cin, cout, kernel_size, padding=0):
        super().__init__()
        self.with_norm = True
        self.with_activation = True
        self.norm_name = "bn"
        self.order = ("conv", "norm", "act")
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=padding, bias=False)
        self.add_module("bn", nn.BatchNorm2d(cout))
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


class PPM(nn.ModuleList):
    def __init__(self, pool_scales, in_channels, channels, align_corners):
        super().__init__()
        self.pool_scales = pool_scales
        self.align_corners = align_corners
        for s in pool_scales:
            self.append(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels, channels, 1)))

    def forward(self, x):
        return [F.interpolate(ppm(x), size=x.size()[2:], mode="bilinear", align_corners=self.align_corners)
                for ppm in self]


class BaseDecodeHead(nn.Module):
    def __init__(self, in_channels, channels, num_classes, in_index=-1, dropout_ratio=0.1, align_corners=False):
        super().__init__()
        self.in_channels, self.channels = in_channels, channels
        self.in_index, self.align_corners = in_index, align_corners
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None

    def _transform_inputs(self, inputs):
        return inputs[self.in_index]

    def cls_seg(self, feat):
        if self.dropout is not None:
            feat = self.dropout(feat)
        return self.conv_seg(feat)

    def loss_by_feat(self, seg_logits, target):  # stands for the methods the replacement must keep
        return F.cross_entropy(seg_logits, target)


class PSPHead(BaseDecodeHead):
    def __init__(self, pool_scales=(1, 2, 3, 6), **kwargs):
        super().__init__(**kwargs)
        self.pool_scales = pool_scales
        self.psp_modules = PPM(pool_scales, self.in_channels, self.channels, self.align_corners)
        self.bottleneck = ConvModule(self.in_channels + len(pool_scales) * self.channels, self.channels, 3, padding=1)

    def _forward_feature(self, inputs):
        x = self._transform_inputs(inputs)
        psp_outs = [x]
        psp_outs.extend(self.psp_modules(x))
        return self.bottleneck(torch.cat(psp_outs, dim=1))

    def forward(self, inputs):
        return self.cls_seg(self._forward_feature(inputs))


class FCNHead(BaseDecodeHead):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.convs = nn.Sequential(ConvModule(self.in_channels, self.channels, 3, padding=1))

    def forward(self, inputs):
        return self.cls_seg(self.convs(self._transform_inputs(inputs)))


class Backbone(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c // 2, 3, padding=1)
        self.conv2 = nn.Conv2d(c // 2, c, 3, padding=1)

    def forward(self, x):
        a = torch.relu(self.conv1(x))
        return [a, torch.relu(self.conv2(a))]


class EncoderDecoder(nn.Module):
    """keys backbone.*, decode_head.{psp_modules.{i}.1.{conv,bn},bottleneck.{conv,bn},conv_seg},
    auxiliary_head.{convs.0.{conv,bn},conv_seg}"""

    def __init__(self, c=16, channels=4, classes=5, align_corners=False):
        super().__init__()
        self.backbone = Backbone(c)
        self.decode_head = PSPHead(in_channels=c, channels=channels, num_classes=classes, in_index=1,
                                   align_corners=align_corners)
        self.auxiliary_head = FCNHead(in_channels=c // 2, channels=4, num_classes=classes, in_index=0)

    def forward(self, x):
        feats = self.backbone(x)
        return self.decode_head(feats), self.auxiliary_head(feats)


# --- segmentation_models_pytorch (decoders/pspnet/decoder.py, base/modules.py) -------------------------------------
class Conv2dReLU(nn.Sequential):
    def __init__(self, cin, cout, kernel_size, padding=0, use_batchnorm=True):
        conv = nn.Conv2d(cin, cout, kernel_size, padding=padding, bias=not use_batchnorm)
        bn = nn.BatchNorm2d(cout) if use_batchnorm else nn.Identity()
        super().__init__(conv, bn, nn.ReLU(inplace=True))


class PSPBlock(nn.Module):
    def __init__(self, in_channels, out_channels, pool_size, use_bathcnorm=True):
        super().__init__()
        if pool_size == 1:
            use_bathcnorm = False  # BatchNorm on a 1x1 map fails in training at batch size 1
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(output_size=(pool_size, pool_size)),
                                  Conv2dReLU(in_channels, out_channels, (1, 1), use_batchnorm=use_bathcnorm))

    def forward(self, x):
        h, w = x.size(2), x.size(3)
        return F.interpolate(self.pool(x), size=(h, w), mode="bilinear", align_corners=True)


class PSPModule(nn.Module):
    def __init__(self, in_channels, sizes=(1, 2, 3, 6), use_bathcnorm=True):
        super().__init__()
        self.blocks = nn.ModuleList(PSPBlock(in_channels, in_channels // len(sizes), s, use_bathcnorm) for s in sizes)

    def forward(self, x):
        return torch.cat([block(x) for block in self.blocks] + [x], dim=1)


class PSPDecoder(nn.Module):
    def __init__(self, encoder_channels=16, use_batchnorm=True, out_channels=8, dropout=0.2):
        super().__init__()
        self.psp = PSPModule(encoder_channels, (1, 2, 3, 6), use_batchnorm)
        self.conv = Conv2dReLU(encoder_channels * 2, out_channels, 1, use_batchnorm=use_batchnorm)
        self.dropout = nn.Dropout2d(p=dropout)

    def forward(self, x):
        return self.dropout(self.conv(self.psp(x)))


class SmpNet(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU())
        self.decoder = PSPDecoder(c)
        self.segmentation_head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.segmentation_head(self.decoder(self.encoder(x)))
