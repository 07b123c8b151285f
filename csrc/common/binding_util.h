// Helpers shared by the per-op binding files (csrc/<area>/<op>_binding.cpp). Each of those
// defines `void lepton::bind_<op>(pybind11::module_&)`; CMake finds them by name and
// bindings.cpp calls every one, so adding an op never edits a shared file.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>

#include "common/status.h"

namespace lepton {

inline void throw_if_error(const Status& status) {
  if (!status.ok) throw std::runtime_error(status.message);
}

// Python hands device pointers over as integers (tensor.data_ptr()).
template <typename T>
T* as_ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }

}  // namespace lepton
