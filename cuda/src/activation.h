// act() of the contract, shared by host and device code so both libraries
// evaluate the same fp32 formulas.
#pragma once

#include <math.h>

#include "tda_kernels.h"

#include "host_device.h"

namespace tda {

template <tda_activation_t A>
TDA_HD float activate(float x) {
  if (A == TDA_ACT_SILU) return x / (1.0f + expf(-x));
  if (A == TDA_ACT_GELU_TANH) return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
  if (A == TDA_ACT_GELU) return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
  return x > 0.0f ? x : 0.0f;
}

}  // namespace tda
