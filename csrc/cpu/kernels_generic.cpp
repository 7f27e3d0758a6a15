// fp32 kernels compiled for the "generic" instruction-set level (flags set in csrc/CMakeLists.txt).
#define DM_NS isa_generic
#define DM_ISA 0
#include "kernels_impl.h"
