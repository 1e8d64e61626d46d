// How this package's C++ errors reach Python, for each module that has bindings.
#pragma once

#include <torch/extension.h>

#include <exception>

#include "common/diagnostics.h"

namespace deepep_megatron {

// DeviceTimeout reaches Python as the builtin TimeoutError, with its message, through a plain
// translator local to the module that calls this (it handles only that module's throws), and the
// module names the class `DeviceTimeout`. Not pybind11's register_exception: it keeps a Python
// exception object in call-once storage per C++ type, which both of this package's modules would
// register for one type.
inline void translate_timeouts(pybind11::module& m) {
    pybind11::register_local_exception_translator([](std::exception_ptr thrown) {
        if (!thrown) return;
        try {
            std::rethrow_exception(thrown);
        } catch (const DeviceTimeout& timeout) {
            PyErr_SetString(PyExc_TimeoutError, timeout.what());
        }
    });
    m.attr("DeviceTimeout") = pybind11::handle(PyExc_TimeoutError);
    // Throws what a timed-out wait throws, from a record as a kernel fills it, without a GPU: tests
    // check the message and its translation.
    m.def(
        "_throw_timeout",
        [](int rank, int peer, int phase, int timed_out_rank, double seconds) {
            TimeoutRecord record{};
            record.written = 1;
            record.rank = rank;
            record.peer = peer;
            record.phase = phase;
            record.expected = 5;
            record.seen = 4;
            record.timed_out_rank = timed_out_rank;
            throw DeviceTimeout(describe_timeout(record, seconds));
        },
        pybind11::arg("rank"), pybind11::arg("peer"), pybind11::arg("phase"), pybind11::arg("timed_out_rank"),
        pybind11::arg("seconds"), pybind11::call_guard<pybind11::gil_scoped_release>());
}

}  // namespace deepep_megatron
