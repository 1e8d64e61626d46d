// The Python module `deepep_megatron._C`: what every family shares (the timeout exception, the
// limits, what the build includes), then each family's classes.
#include "intranode/bindings.h"

#include <torch/extension.h>

#include "common/crash_report.h"
#include "common/limits.h"
#include "common/python_errors.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    using namespace deepep_megatron;
    m.doc() = "deepep_megatron compiled kernels";
    translate_timeouts(m);
    install_crash_report();  // only this module: _nvshmem is never loaded without it

    // Same names and values as deepep_megatron/limits.py, which backends/extension.py compares.
    m.attr("FP8_BLOCK_SIZE") = FP8_BLOCK_SIZE;
    m.attr("MAX_TOPK") = MAX_TOPK;
    m.attr("MAX_RANKS_PER_NODE") = MAX_RANKS_PER_NODE;
    m.attr("MAX_LOCAL_EXPERTS") = MAX_LOCAL_EXPERTS;
    m.attr("REGION_ALIGNMENT") = REGION_ALIGNMENT;
#ifdef DEEPEP_MEGATRON_HAS_NVSHMEM
    m.attr("HAS_NVSHMEM") = true;
#else
    m.attr("HAS_NVSHMEM") = false;
#endif

    intranode::bind_intranode(m);
}
