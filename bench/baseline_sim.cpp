/* baseline.cu compiled as C++17 against kvrt-sim and its cuBLAS shim (bench/meson.build). */
#include "baseline.cu"
