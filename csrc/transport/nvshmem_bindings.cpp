// Python bindings of the NVSHMEM runtime (csrc/transport/nvshmem.hpp), part of `_nvshmem`.
#include <torch/extension.h>

#include "transport/nvshmem.hpp"

namespace py = pybind11;

namespace deepep_megatron {

void register_nvshmem_transport(py::module& m) {
    namespace nv = nvshmem_transport;
    m.def("create_unique_id", [] { return py::bytes(nv::create_unique_id()); });
    m.def("init", &nv::init, py::arg("unique_id"), py::arg("rank"), py::arg("num_ranks"),
          py::call_guard<py::gil_scoped_release>());
    m.def("initialized", &nv::initialized);
    m.def("my_pe", &nv::my_pe);
    m.def("num_pes", &nv::num_pes);
    m.def("allocate", &nv::allocate, py::arg("num_bytes"), py::call_guard<py::gil_scoped_release>());
    m.def("release", &nv::release, py::arg("address"), py::call_guard<py::gil_scoped_release>());
    m.def("peer_address", &nv::peer_address, py::arg("address"), py::arg("pe"));
    m.def("finalize", &nv::finalize, py::call_guard<py::gil_scoped_release>());
    m.def("probe", &nv::probe, py::arg("symmetric_address"), py::call_guard<py::gil_scoped_release>());
}

}  // namespace deepep_megatron
