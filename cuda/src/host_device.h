// TDA_HD: a function both libraries compile, host code for the CPU one and device code for CUDA.
#pragma once

#ifdef __CUDACC__
#define TDA_HD __host__ __device__ __forceinline__
#else
#define TDA_HD inline
#endif
