// Stand-ins for CUDA runtime calls the PPM sources use that emu_prelude.h does not provide (make_emu.py includes this
// after the prelude in each generated PPM unit). The occupancy query answers 2 resident blocks per SM: grid sizes
// derived from it stay small in the emulator, so grid-stride loops run several rounds.
#pragma once
#include <cstddef>

template <typename K>
inline int cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, K, int, size_t) {
  *blocks = 2;
  return 0;
}
