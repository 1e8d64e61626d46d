// `deepep_megatron._nvshmem`: the NVSHMEM families (low-latency, internode), built only where NVSHMEM is
// found (setup.py), so that the intranode `_C` never depends on it. Each family registers its own bindings.
#include <torch/extension.h>

#include "common/python_errors.h"

namespace py = pybind11;

namespace deepep_megatron {
void register_nvshmem_transport(py::module& m);
void register_low_latency(py::module& m);
void register_internode(py::module& m);
}  // namespace deepep_megatron

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "deepep_megatron NVSHMEM families (low-latency, internode)";
    deepep_megatron::translate_timeouts(m);
    deepep_megatron::register_nvshmem_transport(m);
    deepep_megatron::register_low_latency(m);
    deepep_megatron::register_internode(m);
}
