"""`pspnet-fast convert SRC DST --from authors|mmseg`: a checkpoint's keys rewritten to this project's PSPNet layout
(pspnet_fast.models.PSPNet: layer0..layer4, ppm.features.{i}.{1,2}, cls.{0,1,4}, aux.{0,1,4}; PEERS.md section 2).

Mappings (every source key is mapped or the conversion fails naming it; nothing is dropped silently):

  --from authors (hszhao/semseg): the same layout; a `module.` prefix (DistributedDataParallel) is stripped.

  --from mmseg (mmsegmentation EncoderDecoder with PSPHead + FCNHead auxiliary head):
    decode_head.psp_modules.{i}.1.conv.weight   -> ppm.features.{i}.1.weight
    decode_head.psp_modules.{i}.1.bn.*          -> ppm.features.{i}.2.*
    decode_head.bottleneck.conv.weight          -> cls.0.weight
    decode_head.bottleneck.bn.*                 -> cls.1.*
    decode_head.conv_seg.{weight,bias}          -> cls.4.{weight,bias}
    auxiliary_head.convs.0.conv.weight          -> aux.0.weight
    auxiliary_head.convs.0.bn.*                 -> aux.1.*
    auxiliary_head.conv_seg.{weight,bias}       -> aux.4.{weight,bias}
    backbone.conv1.weight / backbone.bn1.*      -> layer0.0.weight / layer0.1.*     (7x7 stem: PSPNet(deep_base=False))
    backbone.layer{1-4}.*                       -> layer{1-4}.*                      (same Bottleneck key names)
  The backbone is converted only when it is this project's: mmseg's ResNetV1c/V1d (keys backbone.stem.*, a 3-32-32-64
  deep stem) is refused, and for a plain-stem ResNet the caller must assert --no-contract-dilation, because
  `contract_dilation` and `style` live in the mmseg config, not in the checkpoint. --head-only converts the heads alone.
  mmseg's PSPHead uses align_corners=False by default: build the model with PSPNet(align_corners=False) (the converted
  file records it); PSPNet resizes the final logits with align_corners=True, as the authors do.

DST holds {"state_dict": ..., "pspnet_fast": {"from", "layers", "num_classes", "levels", "deep_base",
"align_corners"}}, which pspnet_fast.models.load_checkpoint reads.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import torch

from ..models.pspnet import _read_state_dict

__all__ = ["convert_state_dict", "main"]

_LAYERS = {6: 50, 23: 101, 36: 152}  # blocks in layer3 -> depth


class ConversionError(ValueError):
    pass


def _strip(sd: dict, prefix: str) -> dict:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return dict(sd)


_MMSEG_RULES = [
    (r"decode_head\.psp_modules\.(\d+)\.1\.conv\.weight", r"ppm.features.\1.1.weight"),
    (r"decode_head\.psp_modules\.(\d+)\.1\.bn\.(\w+)", r"ppm.features.\1.2.\2"),
    (r"decode_head\.bottleneck\.conv\.weight", r"cls.0.weight"),
    (r"decode_head\.bottleneck\.bn\.(\w+)", r"cls.1.\1"),
    (r"decode_head\.conv_seg\.(weight|bias)", r"cls.4.\1"),
    (r"auxiliary_head\.convs\.0\.conv\.weight", r"aux.0.weight"),
    (r"auxiliary_head\.convs\.0\.bn\.(\w+)", r"aux.1.\1"),
    (r"auxiliary_head\.conv_seg\.(weight|bias)", r"aux.4.\1"),
]
_MMSEG_BACKBONE_RULES = [
    (r"backbone\.conv1\.weight", r"layer0.0.weight"),
    (r"backbone\.bn1\.(\w+)", r"layer0.1.\1"),
    (r"backbone\.(layer[1-4]\.\d+\.(?:conv[123]\.weight|bn[123]\.\w+|downsample\.[01]\.\w+))", r"\1"),
]


def _apply(rules, key):
    for pat, rep in rules:
        if re.fullmatch(pat, key):
            return re.sub(pat, rep, key)
    return None


def _mmseg(sd: dict, head_only: bool, no_contract_dilation: bool) -> dict:
    if any(k.startswith("backbone.stem.") for k in sd) and not head_only:
        raise ConversionError(
            "the checkpoint's backbone is mmsegmentation's ResNetV1c/V1d (backbone.stem.*: deep stem 3-32-32-64, and "
            "its configs contract the first dilation of each dilated stage); pspnet_fast's PSPNet has the authors' "
            "stem (3-64-64-128) or torchvision's and does not implement that variant (no PSPNet(stem='v1c')). "
            "Refusing rather than guessing; --head-only converts the PPM and the heads alone.")
    if any(re.search(r"\.downsample\.2\.", k) for k in sd) and not head_only:
        raise ConversionError("the backbone uses avg_down shortcuts (downsample.{0: AvgPool, 1: conv, 2: bn}: "
                              "mmseg ResNetV1d); pspnet_fast's ResNet does not. Use --head-only.")
    has_backbone = any(k.startswith("backbone.") for k in sd)
    if has_backbone and not head_only and not no_contract_dilation:
        raise ConversionError(
            "an mmsegmentation ResNet backbone's dilation contraction and stride style are in its config, not in the "
            "checkpoint. If the config had contract_dilation=False and style='pytorch' (mmseg's ResNet defaults), pass "
            "--no-contract-dilation; otherwise use --head-only.")
    if any(k.startswith("auxiliary_head.conv_cat.") or k.startswith("auxiliary_head.convs.1.") for k in sd):
        raise ConversionError("the auxiliary FCNHead has concat_input=True or more than one conv; PSPNet's aux is "
                              "one 3x3 ConvModule then conv_seg (num_convs=1, concat_input=False)")
    out, unknown = {}, []
    for k, v in sd.items():
        if k.startswith("backbone.") and head_only:
            continue
        new = _apply(_MMSEG_RULES + ([] if head_only else _MMSEG_BACKBONE_RULES), k)
        if new is None:
            unknown.append(k)
        else:
            out[new] = v
    if unknown:
        raise ConversionError(f"{len(unknown)} keys have no mapping to PSPNet: {', '.join(sorted(unknown)[:20])}"
                              + (" ..." if len(unknown) > 20 else ""))
    return out


def _check_tensors(sd) -> None:
    """ValueError unless sd maps str keys to tensors (names the first bad entry)."""
    if not isinstance(sd, dict):
        raise ValueError(f"expected a state_dict (a dict of tensors), got a {type(sd).__name__}")
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ValueError(f"not a state_dict of tensors: key {k!r} holds a {type(v).__name__}")


def convert_state_dict(sd: dict, source: str, head_only: bool = False, no_contract_dilation: bool = False) -> dict:
    """A state_dict in `source`'s layout ("authors" or "mmseg") -> pspnet_fast.models.PSPNet's keys.
    Raises ConversionError (a ValueError) on anything it cannot map."""
    if source not in ("authors", "mmseg"):
        raise ValueError(f"source must be 'authors' or 'mmseg', got {source!r}")
    _check_tensors(sd)
    sd = _strip(sd, "module.")
    if source == "authors":
        known = re.compile(r"(layer[0-4]|ppm\.features\.\d+|cls|aux)\.")
        bad = [k for k in sd if not known.match(k)]
        if bad:
            raise ConversionError(f"keys outside the authors' PSPNet layout: {', '.join(sorted(bad)[:20])}")
        return dict(sd)
    return _mmseg(sd, head_only, no_contract_dilation)


def describe(sd: dict, source: str) -> dict:
    """What PSPNet(...) the converted state_dict needs, as far as the keys tell. sd: str keys to tensors (else
    ValueError naming the first bad entry)."""
    _check_tensors(sd)
    blocks3 = {int(m.group(1)) for k in sd if (m := re.match(r"layer3\.(\d+)\.", k))}
    levels = len({int(m.group(1)) for k in sd if (m := re.match(r"ppm\.features\.(\d+)\.", k))})
    meta = {"from": source, "levels": levels, "align_corners": source != "mmseg"}
    if blocks3:
        meta["layers"] = _LAYERS.get(max(blocks3) + 1) or -1
        meta["deep_base"] = "layer0.3.weight" in sd
    if "cls.4.weight" in sd:
        meta["num_classes"] = int(sd["cls.4.weight"].shape[0])
    return meta


def _check_destination(dst: str) -> None:
    """OSError naming dst when it cannot be written as a file (a folder, or in a folder that does not exist)."""
    if os.path.isdir(dst):
        raise IsADirectoryError(f"destination {dst} is a folder; give a file name")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"destination folder {parent} does not exist")


def main(argv=None, prog: str = "pspnet-fast convert") -> int:
    p = argparse.ArgumentParser(prog=prog, description="Rewrite a PSPNet checkpoint's keys to pspnet_fast's PSPNet "
                                "layout (mapping documented in pspnet_fast/interop/convert.py and README.md).")
    p.add_argument("src", help="checkpoint to read (a state_dict or {'state_dict': ...})")
    p.add_argument("dst", help="file to write")
    p.add_argument("--from", dest="source", required=True, choices=("authors", "mmseg"))
    p.add_argument("--head-only", action="store_true", help="mmseg: convert the PPM and heads, drop the backbone")
    p.add_argument("--no-contract-dilation", action="store_true",
                   help="mmseg: assert the ResNet backbone was built with contract_dilation=False, style='pytorch'")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)
    try:
        sd = convert_state_dict(_read_state_dict(args.src), args.source, args.head_only, args.no_contract_dilation)
        meta = describe(sd, args.source)
        _check_destination(args.dst)
        torch.save({"state_dict": sd, "pspnet_fast": meta}, args.dst)
    except (ValueError, OSError) as e:  # ConversionError is a ValueError
        if args.debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    args_txt = ", ".join(f"{k}={meta[k]!r}" for k in ("layers", "num_classes", "deep_base", "align_corners")
                         if k in meta)
    print(f"wrote {len(sd)} tensors to {args.dst}; load with "
          f"pspnet_fast.models.load_checkpoint(PSPNet({args_txt}), {args.dst!r})"
          + (f" (bins: {meta['levels']} levels; (1, 2, 3, 6) unless the source used others)" if meta["levels"] else "")
          + (" (strict=False: heads only)" if args.head_only else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
