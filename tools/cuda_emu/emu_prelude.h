// Host emulation of the CUDA constructs used by ppm_cuda.cu: every CUDA thread is a std::thread, __syncthreads a
// std::barrier, blocks run one after another. Test harness only.
#pragma once
#include <algorithm>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#include <c10/core/Device.h>
#include <c10/util/Exception.h>
using std::max;
using std::min;
struct dim3 { unsigned x = 1, y = 1, z = 1; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline thread_local dim3 threadIdx;
inline dim3 blockIdx, blockDim, gridDim;
inline std::barrier<>* g_bar = nullptr;
inline unsigned char* g_dyn_smem = nullptr;
inline void __syncthreads() { g_bar->arrive_and_wait(); }
template <typename T> inline T __ldg(const T* p) { return *p; }
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
inline int cudaGetDevice(int* d) { *d = 0; return 0; }
inline int cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? 4 : 227 * 1024;
  return 0;
}
inline long long g_smem_limit = 48 * 1024;
inline long long g_max_smem_seen = 0;
inline long long g_launches = 0;
inline int cudaFuncSetAttribute(const void*, cudaFuncAttribute, int v) { g_smem_limit = v; return 0; }
#define C10_CUDA_CHECK(x) (void)(x)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() (void)0
namespace c10::cuda {
struct CUDAGuard { explicit CUDAGuard(c10::Device) {} };
inline int getCurrentCUDAStream() { return 0; }
}  // namespace c10::cuda

template <typename K, typename... A>
void emu_launch(K kernel, unsigned grid, int block, long long smem, int, A... args) {
  TORCH_CHECK(grid >= 1 && block >= 1 && block <= 1024, "emu: bad launch ", grid, " x ", block);
  TORCH_CHECK(smem <= std::max<long long>(48 * 1024, g_smem_limit), "emu: smem ", smem, " over limit ", g_smem_limit);
  TORCH_CHECK(smem <= 227 * 1024, "emu: smem ", smem, " over device max");
  g_max_smem_seen = std::max(g_max_smem_seen, smem);
  ++g_launches;
  g_smem_limit = 48 * 1024;
  gridDim = {grid, 1, 1};
  blockDim = {static_cast<unsigned>(block), 1, 1};
  std::vector<unsigned char> buf(smem + 64);
  unsigned char* base = buf.data() + (16 - reinterpret_cast<uintptr_t>(buf.data()) % 16) % 16;
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx = {b, 1, 1};
    std::fill(buf.begin(), buf.end(), 0xFF);  // NaN garbage: reading shared memory nobody wrote shows
    g_dyn_smem = base;
    std::barrier<> bar(block);
    g_bar = &bar;
    std::vector<std::thread> ts;
    ts.reserve(block);
    for (int t = 0; t < block; ++t) {
      ts.emplace_back([&, t] {
        threadIdx = {static_cast<unsigned>(t), 0, 0};
        kernel(args...);
        bar.arrive_and_drop();
      });
    }
    for (auto& th : ts) th.join();
  }
}
