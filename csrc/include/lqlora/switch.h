// Runtime config -> template parameter, once, at the launcher (flash-attention's
// static_switch.h pattern). Each switch ends in a clear error for unsupported values.
#pragma once
#include <c10/util/Exception.h>

#define LQ_BITS_CASE(B, ...)          \
  case B: {                           \
    constexpr int kBits = B;          \
    __VA_ARGS__();                    \
    break;                            \
  }

// Calls the lambda body with `constexpr int kBits` equal to `bits` (2..8).
#define LQ_BITS_SWITCH(bits, ...)                                             \
  [&] {                                                                       \
    switch (bits) {                                                           \
      LQ_BITS_CASE(2, __VA_ARGS__)                                            \
      LQ_BITS_CASE(3, __VA_ARGS__)                                            \
      LQ_BITS_CASE(4, __VA_ARGS__)                                            \
      LQ_BITS_CASE(5, __VA_ARGS__)                                            \
      LQ_BITS_CASE(6, __VA_ARGS__)                                            \
      LQ_BITS_CASE(7, __VA_ARGS__)                                            \
      LQ_BITS_CASE(8, __VA_ARGS__)                                            \
      default:                                                                \
        TORCH_CHECK_VALUE(false, "lqlora: unsupported bit width ", bits,      \
                          " (supported: 2..8)");                             \
    }                                                                         \
  }()
