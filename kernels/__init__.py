"""Triton kernels of pspnet_fast, installed as the subpackage pspnet_fast.kernels: ppm_triton (the PPM ops) and
head_triton (the fused head's ops), each registered as torch.library.triton_op."""
