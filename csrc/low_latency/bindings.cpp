// Python bindings of the low-latency family (LowLatencyRuntime and its call records), part of
// `_nvshmem`.
#include <torch/extension.h>

#include "low_latency/layout.h"
#include "low_latency/runtime.hpp"

namespace py = pybind11;

namespace deepep_megatron {

void register_low_latency(py::module& m) {
    using low_latency::CombineCall;
    using low_latency::DispatchCall;
    using low_latency::LowLatencyRuntime;
    m.attr("LL_MAX_TOPK") = low_latency::kMaxTopk;
    m.attr("LL_MAX_LOCAL_EXPERTS") = low_latency::kMaxLocalExperts;
    m.attr("LL_PART_CHANNELS") = low_latency::kPartChannels;

    py::class_<DispatchCall, std::shared_ptr<DispatchCall>>(m, "LowLatencyDispatchCall")
        .def_readonly("recv_x", &DispatchCall::recv_x)
        .def_readonly("recv_scales", &DispatchCall::recv_scales)
        .def_readonly("recv_count", &DispatchCall::recv_count)
        .def_readonly("recv_src_info", &DispatchCall::recv_src_info)
        .def_readonly("recv_route", &DispatchCall::recv_route)
        .def_readonly("recv_layout_range", &DispatchCall::recv_layout_range)
        .def_readonly("received", &DispatchCall::received);
    py::class_<CombineCall, std::shared_ptr<CombineCall>>(m, "LowLatencyCombineCall")
        .def_readonly("combined_x", &CombineCall::combined_x)
        .def_readonly("received", &CombineCall::received);

    py::class_<LowLatencyRuntime>(m, "LowLatencyRuntime")
        .def(py::init<int, int, int64_t, int64_t, const std::vector<int64_t>&, double>(), py::arg("rank"),
             py::arg("num_ranks"), py::arg("block_address"), py::arg("block_bytes"), py::arg("peer_bases"),
             py::arg("timeout_seconds"))
        .def_static("required_bytes", &LowLatencyRuntime::required_bytes, py::arg("max_tokens"),
                    py::arg("hidden"), py::arg("num_ranks"), py::arg("num_experts"))
        .def("dispatch", &LowLatencyRuntime::dispatch, py::arg("x"), py::arg("topk_idx"),
             py::arg("max_tokens"), py::arg("num_experts"), py::arg("use_fp8"), py::arg("round_scale"),
             py::arg("use_ue8m0"), py::arg("bank"), py::arg("num_sms"), py::arg("receive"),
             py::arg("cumulative_recv_stats"), py::arg("wait_recv_stats"))
        .def("dispatch_receive", &LowLatencyRuntime::dispatch_receive, py::arg("call"))
        .def("combine", &LowLatencyRuntime::combine, py::arg("x"), py::arg("topk_idx"),
             py::arg("topk_weights"), py::arg("recv_count"), py::arg("recv_src_info"), py::arg("recv_route"),
             py::arg("max_tokens"), py::arg("num_experts"), py::arg("bank"), py::arg("zero_copy"),
             py::arg("out"), py::arg("num_sms"), py::arg("receive"), py::arg("wait_recv_stats"))
        .def("combine_receive", &LowLatencyRuntime::combine_receive, py::arg("call"))
        .def("combine_buffer", &LowLatencyRuntime::combine_buffer, py::arg("bank"), py::arg("max_tokens"),
             py::arg("hidden"), py::arg("num_experts"))
        .def("clean", &LowLatencyRuntime::clean, py::arg("max_tokens"), py::arg("hidden"),
             py::arg("num_experts"))
        .def("check_health", &LowLatencyRuntime::check_health)
        .def("destroy", &LowLatencyRuntime::destroy);
}

}  // namespace deepep_megatron
