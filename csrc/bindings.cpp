// Python bindings of the compiled backend: `deepep_megatron._C`.
#include <torch/extension.h>

#include "runtime.hpp"

namespace py = pybind11;
using deepep_megatron::DispatchOutputs;
using deepep_megatron::IntranodeRuntime;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "deepep_megatron compiled intranode kernels";
    py::register_exception<deepep_megatron::DeviceTimeout>(m, "DeviceTimeout", PyExc_TimeoutError);
    m.attr("MAX_RANKS_PER_NODE") = deepep_megatron::kMaxRanks;
    m.attr("MAX_TOPK") = deepep_megatron::kMaxTopk;
    m.attr("FP8_BLOCK_SIZE") = 128;
    m.attr("REGION_ALIGNMENT") = deepep_megatron::kRegionAlignment;
    m.attr("MAX_BLOCKS") = deepep_megatron::kMaxBlocks;
    m.attr("MAX_LOCAL_EXPERTS") = deepep_megatron::kMaxLocalExperts;
    m.attr("SIGNAL_AREA_BYTES") = deepep_megatron::kSignalAreaBytes;
#ifdef DEEPEP_MEGATRON_HAS_NVSHMEM
    m.attr("HAS_NVSHMEM") = true;
#else
    m.attr("HAS_NVSHMEM") = false;
#endif

    py::class_<DispatchOutputs>(m, "DispatchOutputs")
        .def_readonly("recv_x", &DispatchOutputs::recv_x)
        .def_readonly("recv_scales", &DispatchOutputs::recv_scales)
        .def_readonly("recv_topk_idx", &DispatchOutputs::recv_topk_idx)
        .def_readonly("recv_topk_weights", &DispatchOutputs::recv_topk_weights)
        .def_readonly("recv_src_idx", &DispatchOutputs::recv_src_idx)
        .def_readonly("count_matrix", &DispatchOutputs::count_matrix)
        .def_readonly("send_slot", &DispatchOutputs::send_slot)
        .def_readonly("num_recv_tokens", &DispatchOutputs::num_recv_tokens)
        .def_readonly("num_recv_tokens_per_expert", &DispatchOutputs::num_recv_tokens_per_expert)
        .def_readonly("zero_copy", &DispatchOutputs::zero_copy);

    py::class_<IntranodeRuntime>(m, "IntranodeRuntime")
        .def(py::init<int, int, int64_t, int64_t, double>(), py::arg("rank"), py::arg("num_ranks"),
             py::arg("staging_bytes"), py::arg("arena_bytes"), py::arg("timeout_seconds"))
        .def("ipc_handle", [](const IntranodeRuntime& self) { return py::bytes(self.ipc_handle()); })
        .def("open_peers", &IntranodeRuntime::open_peers)
        .def("layout", &IntranodeRuntime::layout)
        .def("dispatch", &IntranodeRuntime::dispatch, py::call_guard<py::gil_scoped_release>())
        .def("combine", &IntranodeRuntime::combine, py::call_guard<py::gil_scoped_release>())
        .def("check_health", &IntranodeRuntime::check_health)
        .def("destroy", &IntranodeRuntime::destroy)
        .def_property_readonly("staging_bytes", &IntranodeRuntime::staging_bytes)
        .def_property_readonly("arena_bytes_in_use", &IntranodeRuntime::arena_bytes_in_use);
}
