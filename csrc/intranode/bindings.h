// The intranode family's part of the Python module (called from csrc/bindings.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace deepep_megatron::intranode {

void bind_intranode(pybind11::module& m);

}  // namespace deepep_megatron::intranode
