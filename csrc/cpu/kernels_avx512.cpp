// fp32 kernels compiled for the "avx512" instruction-set level (flags set in csrc/CMakeLists.txt).
#define DM_NS isa_avx512
#define DM_ISA 2
#include "kernels_impl.h"
