// How this package's C++ errors reach Python, for each module that has bindings.
#pragma once

#include <torch/extension.h>

#include <exception>

#include "common/diagnostics.h"

namespace deepep_megatron {

// DeviceTimeout reaches Python as the builtin TimeoutError, with its message, through a plain
// translator local to the module that calls this (it handles only that module's throws), and the
// module names the class `DeviceTimeout`. Not pybind11's register_exception: it keeps a Python
// exception object in call-once storage per C++ type, and with both of this package's modules
// registering one type, every thrown timeout crashed the process on the GPU machine (torch 2.11).
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
    // Throws what a timed-out wait throws, without a GPU: tests check the translation.
    m.def(
        "_throw_timeout", [](const std::string& message) { throw DeviceTimeout(message); },
        pybind11::arg("message"), pybind11::call_guard<pybind11::gil_scoped_release>());
}

}  // namespace deepep_megatron
