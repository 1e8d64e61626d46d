// Binding a family's argument structs to Python: a class with a default constructor and every
// field readable and writable by name (backends/extension.py's fill_args sets them by name).
#pragma once

#include <torch/extension.h>

#include <utility>

namespace deepep_megatron {

template <typename T, typename Member>
std::pair<const char*, Member T::*> field(const char* name, Member T::* member) {
    return {name, member};
}

template <typename Args, typename... Fields>
void bind_args(pybind11::module& m, const char* name, const char* doc, Fields... fields) {
    pybind11::class_<Args> cls(m, name, doc);
    cls.def(pybind11::init<>());
    (cls.def_readwrite(fields.first, fields.second), ...);
}

}  // namespace deepep_megatron
