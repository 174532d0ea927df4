"""Triton kernels of pspnet_fast, installed as the subpackage pspnet_fast.kernels: ppm_triton (the PPM ops) and
head_triton (the fused head's ops), each registered as torch.library.triton_op.

ppm_triton imports the PPM's stages and re-exports them: triton_common (shared helpers), triton_pool, triton_reduce,
triton_upsample, triton_backward. ptx_report compiles them offline for a GPU that is not here."""
