// fp32 kernels compiled for the "avx2" instruction-set level (flags set in csrc/CMakeLists.txt).
#define DM_NS isa_avx2
#define DM_ISA 1
#include "kernels_impl.h"
