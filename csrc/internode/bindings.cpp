// Python bindings of the internode family (InternodeRuntime and the argument and result classes of
// its calls), part of `_nvshmem`; deepep_megatron/backends/internode.py is their only user.
#include <torch/extension.h>

#include "common/bind_args.h"
#include "common/diagnostics.h"
#include "common/limits.h"
#include "internode/args.hpp"
#include "internode/runtime.hpp"

namespace py = pybind11;

namespace deepep_megatron {

void register_internode(py::module& m) {
    using namespace internode;
    m.attr("MAX_NODES") = MAX_NODES;

    using D = DispatchArgs;
    bind_args<D>(m, "InternodeDispatchArgs", "An internode dispatch (fresh, or cached without top-k).",
                 field("x", &D::x), field("scales", &D::scales), field("topk_idx", &D::topk_idx),
                 field("topk_weights", &D::topk_weights), field("send_slot", &D::send_slot),
                 field("node_slot", &D::node_slot), field("count_matrix", &D::count_matrix),
                 field("own_node_tokens", &D::own_node_tokens),
                 field("records_from_node", &D::records_from_node), field("max_tokens", &D::max_tokens),
                 field("max_recv_rows", &D::max_recv_rows), field("num_recv_rows", &D::num_recv_rows),
                 field("num_recv_tokens", &D::num_recv_tokens),
                 field("experts_per_rank", &D::experts_per_rank), field("num_sms", &D::num_sms));
    using C = CombineArgs;
    bind_args<C>(m, "InternodeCombineArgs", "An internode combine of the rows a dispatch delivered.",
                 field("x", &C::x), field("topk_weights", &C::topk_weights), field("bias0", &C::bias0),
                 field("bias1", &C::bias1), field("forward_rows", &C::forward_rows),
                 field("node_slot", &C::node_slot), field("records_from_node", &C::records_from_node),
                 field("tokens_to_node", &C::tokens_to_node), field("max_tokens", &C::max_tokens),
                 field("max_recv_rows", &C::max_recv_rows), field("num_recv_tokens", &C::num_recv_tokens),
                 field("num_tokens", &C::num_tokens), field("num_sms", &C::num_sms));

    py::class_<DispatchOutputs>(m, "InternodeDispatchOutputs")
        .def_readonly("recv_x", &DispatchOutputs::recv_x)
        .def_readonly("recv_scales", &DispatchOutputs::recv_scales)
        .def_readonly("recv_topk_idx", &DispatchOutputs::recv_topk_idx)
        .def_readonly("recv_topk_weights", &DispatchOutputs::recv_topk_weights)
        .def_readonly("recv_src_idx", &DispatchOutputs::recv_src_idx)
        .def_readonly("forward_rows", &DispatchOutputs::forward_rows);
    py::class_<CombineOutputs>(m, "InternodeCombineOutputs")
        .def_readonly("combined_x", &CombineOutputs::combined_x)
        .def_readonly("combined_weights", &CombineOutputs::combined_weights);

    py::class_<Runtime>(m, "InternodeRuntime")
        .def(py::init<int, int, int, int64_t, int64_t, const std::vector<int64_t>&, double>(),
             py::arg("rank"), py::arg("num_ranks"), py::arg("ranks_per_node"), py::arg("block_address"),
             py::arg("block_bytes"), py::arg("node_peer_bases"), py::arg("timeout_seconds"))
        .def_static("required_bytes", &Runtime::required_bytes, py::arg("max_tokens"), py::arg("hidden"),
                    py::arg("num_topk"), py::arg("num_ranks"), py::arg("ranks_per_node"),
                    py::arg("max_recv_rows"))
        .def("dispatch", &Runtime::dispatch, py::arg("args"))
        .def("combine", &Runtime::combine, py::arg("args"))
        .def("check_health", &Runtime::check_health)
        .def("destroy", &Runtime::destroy);
}

}  // namespace deepep_megatron
