// Host emulation of the CUDA constructs used by csrc/cuda/*.cu: every CUDA thread is a std::thread, __syncthreads a
// std::barrier, blocks run one after another. Test harness only.
//
// Launch log: every emu_launch appends "<kernel> grid=X,Y,Z block=X,Y,Z smem=B" to g_launch_log (the kernel's
// demangled name through dladdr when the kernel has a dynamic symbol, i.e. external linkage: the generators turn the
// sources' anonymous namespace into an inline namespace for that; else "?+0x<offset in the library>"). An op library
// exposes it with emu_launch_log_defs() (see below) inside its TORCH_LIBRARY block.
#pragma once
#include <cxxabi.h>
#include <dlfcn.h>

#include <algorithm>
#include <barrier>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>
#include <c10/core/Device.h>
#include <c10/util/Exception.h>
using std::max;
using std::min;
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3() = default;
  dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}  // NOLINT: as CUDA's, implicit
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline thread_local dim3 threadIdx;
inline dim3 blockIdx, blockDim, gridDim;
inline std::barrier<>* g_bar = nullptr;
inline unsigned char* g_dyn_smem = nullptr;
inline void __syncthreads() { g_bar->arrive_and_wait(); }
template <typename T> inline T __ldg(const T* p) { return *p; }
inline double __drcp_rn(double x) { return 1.0 / x; }
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
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

inline std::vector<std::string> g_launch_log;
constexpr size_t kLaunchLogMax = 100000;  // a long test run keeps its first launches, not unbounded memory

// "name<args>" of the function at address f: its demangled symbol without the parameter list and namespaces.
inline std::string emu_kernel_name(const void* f) {
  Dl_info info{};
  if (dladdr(f, &info) == 0) return "?";
  if (info.dli_sname == nullptr || info.dli_saddr != f) {
    char buf[32];
    snprintf(buf, sizeof buf, "?+0x%llx",
             static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(f) -
                                             reinterpret_cast<uintptr_t>(info.dli_fbase)));
    return buf;
  }
  int status = 0;
  char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
  std::string s = status == 0 && d ? d : info.dli_sname;
  std::free(d);
  // Drop "void " and the parameter list (the first '(' at template depth 0 that is not "(anonymous").
  if (s.rfind("void ", 0) == 0) s = s.substr(5);
  int depth = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '<') ++depth;
    if (s[i] == '>') --depth;
    if (s[i] == '(' && depth == 0 && s.compare(i, 10, "(anonymous") != 0) {
      s.resize(i);
      break;
    }
  }
  for (const char* ns : {"pspnet_fast::", "emu_visible::", "(anonymous namespace)::", "c10::"}) {
    for (size_t at; (at = s.find(ns)) != std::string::npos;) s.erase(at, strlen(ns));
  }
  return s;
}

template <typename K, typename... A>
void emu_launch(K kernel, dim3 grid, dim3 block, long long smem, int, A... args) {
  const long long nthreads = static_cast<long long>(block.x) * block.y * block.z;
  const long long nblocks = static_cast<long long>(grid.x) * grid.y * grid.z;
  TORCH_CHECK(nblocks >= 1 && nthreads >= 1 && nthreads <= 1024 && block.z <= 64, "emu: bad launch ", nblocks,
              " x ", nthreads);
  TORCH_CHECK(grid.y <= 65535 && grid.z <= 65535, "emu: grid.y / grid.z over 65535: ", grid.y, ", ", grid.z);
  TORCH_CHECK(smem <= std::max<long long>(48 * 1024, g_smem_limit), "emu: smem ", smem, " over limit ", g_smem_limit);
  TORCH_CHECK(smem <= 227 * 1024, "emu: smem ", smem, " over device max");
  g_max_smem_seen = std::max(g_max_smem_seen, smem);
  ++g_launches;
  if (g_launch_log.size() < kLaunchLogMax) {
    g_launch_log.push_back(emu_kernel_name(reinterpret_cast<const void*>(kernel)) + " grid=" +
                           std::to_string(grid.x) + "," + std::to_string(grid.y) + "," + std::to_string(grid.z) +
                           " block=" + std::to_string(block.x) + "," + std::to_string(block.y) + "," +
                           std::to_string(block.z) + " smem=" + std::to_string(smem));
  }
  g_smem_limit = 48 * 1024;
  gridDim = grid;
  blockDim = block;
  const int nt = static_cast<int>(nthreads);
  std::vector<unsigned char> buf(smem + 64);
  unsigned char* base = buf.data() + (16 - reinterpret_cast<uintptr_t>(buf.data()) % 16) % 16;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = {bx, by, bz};
        std::fill(buf.begin(), buf.end(), 0xFF);  // NaN garbage: reading shared memory nobody wrote shows
        g_dyn_smem = base;
        std::barrier<> bar(nt);
        g_bar = &bar;
        std::vector<std::thread> ts;
        ts.reserve(nt);
        for (int t = 0; t < nt; ++t) {
          ts.emplace_back([&, t] {
            threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            kernel(args...);
            bar.arrive_and_drop();
          });
        }
        for (auto& th : ts) th.join();
      }
    }
  }
}

// Registers the launch log ops in a TORCH_LIBRARY block: `emu_launch_log_defs(m);` gives
//   emu_launch_log() -> str[]   the launches since the last clear, one line each
//   emu_launch_log_clear() -> ()
template <typename Library>
void emu_launch_log_defs(Library& m) {
  m.def("emu_launch_log() -> str[]", []() { return g_launch_log; });
  m.def("emu_launch_log_clear() -> ()", []() { g_launch_log.clear(); });
}
