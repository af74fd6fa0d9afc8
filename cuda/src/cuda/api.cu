// Library identity for the CUDA build of tda_kernels.h.
#include "common.h"

extern "C" const char* tda_status_string(tda_status_t s) { return tda::status_text(s); }
extern "C" const char* tda_backend(void) { return "cuda"; }
extern "C" int tda_abi_version(void) { return TDA_KERNELS_ABI_VERSION; }
