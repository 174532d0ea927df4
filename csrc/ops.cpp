// Every op's schema, declared once. Backends implement them in cpu/*.cpp and cuda/*.cu; fake (meta) kernels and
// autograd live in pspnet_fast/ops/ (fake.py, autograd.py). The Triton backend registers its own ops
// (pspnet_fast::triton_*) from Python.
//
// Shapes (S = sum over levels of b_l^2; level l's bins sit at columns [off_l, off_l + b_l^2), row-major i * b_l + j):
//   pyramid_pool(x (N, C, H, W), bins)                        -> pooled (N, C, S), float32 (float64 for float64 x)
//   ppm_reduce(pooled (N, C, S), weight (L, R, C), scale (L, R)?, shift (L, R)?, bins, relu)
//                                                             -> levels (N, R, S), pooled's dtype
//   upsample_concat(x (N, C, H, W), levels (N, R, S), bins, align_corners)
//                                                             -> out (N, C + L*R, H, W), x's dtype and memory format
// Their adjoints, deterministic (every output element is reduced by the one program that owns it, no atomics):
//   upsample_concat_backward(grad_out (N, C + L*R, H, W), C, bins, align_corners)
//                                                             -> grad_levels (N, R, S), float32 (float64)
//   pyramid_pool_backward(grad_pooled (N, C, S), grad_out (N, C', H, W) with C' >= C, bins, x_offset)
//                                                             -> grad_x = grad_out[:, x_offset:x_offset + C]
//                                                                + pool^T(grad_pooled),
//                                                                (N, C, H, W) in grad_out's dtype and memory format
// x_last (default false) puts x after the levels, out = [levels..., x] (segmentation_models_pytorch's order); the
// adjoints read that layout with x_last / x_offset = L*R (CPU kernels; the CUDA adjoints refuse them and are given
// the views grad_out[:, :L*R] with in_channels = 0 and grad_out[:, L*R:] instead, see pspnet_fast/_order.py).
// The eval forward with X read once (x is pooled and copied into its channels of out in the same pass; a second
// pass writes only the level channels):
//   ppm_forward(x (N, C, H, W), weight (L, R, C), scale (L, R)?, shift (L, R)?, bins, relu, align_corners, x_last)
//       -> out = upsample_concat(x, ppm_reduce(pyramid_pool(x, bins), weight, scale, shift, bins, relu), bins,
//                                align_corners, x_last), bit for bit the composition's values;
//          weight, scale, shift in pyramid_pool's output dtype (float32; float64 for float64 x)
// The fused PSP head (the 3x3 bottleneck split as conv3x3(x; W_X) + context of the small level maps, see
// pspnet_fast/nn/head.py; q[n, o, t, off_l + s] = W_l[o, :, t / 3, t % 3] . P_l[n, :, s], t = 3 * dy + dx):
//   head_epilogue(z (N, O, H, W), q (N, O, 9, S), bins, align_corners, scale (O)?, shift (O)?, relu)
//       -> out = act((z + context(q)) * scale + shift), z's dtype and memory format; q, scale, shift float32
//          (float64 for float64 z); context(n, o, y, x) = sum over levels l and taps t = (dy, dx) with
//          0 <= y + dy - 1 < H and 0 <= x + dx - 1 < W of bilinear_l(q[n, o, t, level l])(y + dy - 1, x + dx - 1),
//          bilinear_l being the upsample of the b_l x b_l map to H x W (upsample_concat's rules)
//   head_context_backward(grad (N, O, H, W), bins, align_corners)
//       -> grad_q (N, O, 9, S) = context's adjoint applied to grad, float32 (float64), deterministic
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace {
std::vector<std::string> build_info() {
  std::vector<std::string> parts{"cpu"};
#ifdef PSPNET_FAST_WITH_CUDA
  parts.push_back(std::string("cuda:") + PSPNET_FAST_CUDA_ARCHS);
#endif
  return parts;
}
}  // namespace

// A Python module named _C, so that `import pspnet_fast._C` loads this library and runs the registrations below.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(pspnet_fast, m) {
  m.def("pyramid_pool(Tensor x, int[] bins) -> Tensor");
  m.def("ppm_reduce(Tensor pooled, Tensor weight, Tensor? scale, Tensor? shift, int[] bins, bool relu) -> Tensor");
  m.def("upsample_concat(Tensor x, Tensor levels, int[] bins, bool align_corners, bool x_last=False) -> Tensor");
  m.def("upsample_concat_backward(Tensor grad_out, int in_channels, int[] bins, bool align_corners, bool x_last=False) "
        "-> Tensor");
  m.def("pyramid_pool_backward(Tensor grad_pooled, Tensor grad_out, int[] bins, int x_offset=0) -> Tensor");
  m.def("ppm_forward(Tensor x, Tensor weight, Tensor? scale, Tensor? shift, int[] bins, bool relu, bool align_corners, "
        "bool x_last=False) -> Tensor");
  m.def("head_epilogue(Tensor z, Tensor q, int[] bins, bool align_corners, Tensor? scale, Tensor? shift, bool relu) "
        "-> Tensor");
  m.def("head_context_backward(Tensor grad, int[] bins, bool align_corners) -> Tensor");
  // Which backends this binary holds: "cpu" always, "cuda:<archs>" when the CUDA sources were compiled in.
  m.def("build_info() -> str[]", &build_info);
}
