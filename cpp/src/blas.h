// The CBLAS calls the executor makes. scipy-openblas32 (PyPI) prefixes every symbol with scipy_ so it
// can sit next to another BLAS in one process; TDA_BLAS_SCIPY_PREFIX maps the standard names onto it.
#pragma once
#ifdef TDA_BLAS_SCIPY_PREFIX
#define cblas_sgemm scipy_cblas_sgemm
#define cblas_sgemv scipy_cblas_sgemv
#define openblas_set_num_threads scipy_openblas_set_num_threads
#endif
#include <cblas.h>
