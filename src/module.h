// What both extension modules export: their FFI targets and the FFI API version they were built with.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>

#include <initializer_list>
#include <utility>

#include "xla/ffi/api/c_api.h"

namespace jax_moe {

using Target = std::pair<const char*, XLA_FFI_Handler*>;

// Defines `registrations()` (target name -> capsule) and `ffi_api_version()` on module m.
inline void define_module(nanobind::module_& m, std::initializer_list<Target> targets) {
  nanobind::dict regs;
  for (const auto& [name, handler] : targets) regs[name] = nanobind::capsule(reinterpret_cast<void*>(handler));
  m.def("registrations", [regs]() { return regs; });
  m.def("ffi_api_version", []() { return std::make_pair(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR); });
}

}  // namespace jax_moe
