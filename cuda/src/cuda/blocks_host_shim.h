// The CUDA built-ins blocks.cuh uses, as plain C++ for a host compiler, so a
// test can run the device reading of the blocks on the CPU
// (tests/cuda_blocks_host_main.cpp). Never included by nvcc.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifndef __device__
#define __device__
#endif
#ifndef __host__
#define __host__
#endif
#ifndef __forceinline__
#define __forceinline__ inline
#endif

template <class T>
inline T __ldg(const T* p) {
  T v;
  memcpy(&v, p, sizeof(T));
  return v;
}

inline float __uint_as_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// The grid a kernel body sees; the test sets them before each call.
struct TdaHostDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local TdaHostDim3 blockIdx, threadIdx, blockDim, gridDim;
