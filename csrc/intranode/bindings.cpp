// Python bindings of the intranode family: _C.IntranodeRuntime and the argument and result
// classes of its calls (deepep_megatron/backends/intranode.py is their only user).
#include "intranode/bindings.h"

#include <torch/extension.h>

#include "common/bind_args.h"
#include "intranode/args.hpp"
#include "intranode/runtime.hpp"

namespace py = pybind11;

namespace deepep_megatron::intranode {

void bind_intranode(py::module& m) {
    using F = FreshDispatchArgs;
    bind_args<F>(m, "FreshDispatchArgs", "A dispatch that computes its layout (count exchange).",
                 field("x", &F::x), field("scales", &F::scales), field("topk_idx", &F::topk_idx),
                 field("topk_weights", &F::topk_weights), field("is_token_in_rank", &F::is_token_in_rank),
                 field("num_tokens_per_expert", &F::num_tokens_per_expert),
                 field("num_worst_tokens", &F::num_worst_tokens),
                 field("expert_alignment", &F::expert_alignment), field("num_sms", &F::num_sms));
    using C = CachedDispatchArgs;
    bind_args<C>(m, "CachedDispatchArgs", "A dispatch that repeats the layout of an earlier one.",
                 field("x", &C::x), field("scales", &C::scales), field("count_matrix", &C::count_matrix),
                 field("send_slot", &C::send_slot), field("num_recv_rows", &C::num_recv_rows),
                 field("num_worst_tokens", &C::num_worst_tokens), field("num_sms", &C::num_sms));
    using B = CombineArgs;
    bind_args<B>(m, "CombineArgs", "A combine of the rows a dispatch delivered.", field("x", &B::x),
                 field("topk_weights", &B::topk_weights), field("bias0", &B::bias0),
                 field("bias1", &B::bias1), field("send_slot", &B::send_slot),
                 field("count_matrix", &B::count_matrix), field("num_tokens", &B::num_tokens),
                 field("num_sms", &B::num_sms));

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
    py::class_<CombineOutputs>(m, "CombineOutputs")
        .def_readonly("combined_x", &CombineOutputs::combined_x)
        .def_readonly("combined_weights", &CombineOutputs::combined_weights);

    // The calls that launch release the GIL: the fresh dispatch waits for its peers on the host.
    py::class_<Runtime>(m, "IntranodeRuntime")
        .def(py::init<int, int, int64_t, int64_t, double>(), py::arg("rank"), py::arg("num_ranks"),
             py::arg("staging_bytes"), py::arg("arena_bytes"), py::arg("timeout_seconds"))
        .def("ipc_handle", [](const Runtime& self) { return py::bytes(self.ipc_handle()); })
        .def("open_peers", &Runtime::open_peers)
        .def("layout", &Runtime::layout)
        .def("dispatch_fresh", &Runtime::dispatch_fresh, py::call_guard<py::gil_scoped_release>())
        .def("dispatch_cached", &Runtime::dispatch_cached, py::call_guard<py::gil_scoped_release>())
        .def("combine", &Runtime::combine, py::call_guard<py::gil_scoped_release>())
        .def("destroy", &Runtime::destroy)
        .def_property_readonly("staging_bytes", &Runtime::staging_bytes)
        .def_property_readonly("arena_bytes_in_use", &Runtime::arena_bytes_in_use);
}

}  // namespace deepep_megatron::intranode
