# Grouped GEMM sources and CUTLASS discovery, for the top-level CMakeLists.txt.
#
# What the includer must do:
#   include(${CMAKE_CURRENT_SOURCE_DIR}/src/grouped_gemm_sources.cmake)
#   1. Compile ${JAX_MOE_GEMM_GENERIC_SOURCES} into the CUDA extension like its other CUDA sources,
#      for any architecture list (they need no CUTLASS; src/ must be on the include path).
#   2. jax_moe_find_cutlass(CUTLASS_INCLUDE_DIRS). If it is non-empty and the build targets Hopper,
#      compile ${JAX_MOE_GEMM_SM90_SOURCES} for sm_90a ONLY, with the include dirs
#      ${CUTLASS_INCLUDE_DIRS} and the options
#        -gencode=arch=compute_90a,code=sm_90a -DNDEBUG --expt-relaxed-constexpr -std=c++17
#      (-DNDEBUG is mandatory: grouped_gemm_sm90.cuh refuses to compile without it), link them into
#      the extension, and define JAX_MOE_HAS_SM90_GEMM when compiling src/grouped_gemm.cu (defining
#      it for the whole extension target is fine). The helper
#        jax_moe_add_gemm_sm90_objects(<object library name> "${CUTLASS_INCLUDE_DIRS}")
#      does the compile part: it creates an OBJECT library with exactly those flags (its
#      CUDA_ARCHITECTURES is OFF so CMake adds no other -gencode); link it with
#      target_link_libraries(<ext> PRIVATE <name>) or add $<TARGET_OBJECTS:<name>> to the sources.
#   Without CUTLASS (or JAX_MOE_HAS_SM90_GEMM undefined), grouped_gemm runs the generic kernels on
#   every GPU.
# Each sm90 source holds one CUTLASS instantiation (~50-80 s and ~3.6 GB of compiler memory each):
# parallel builds need that much memory per job.

set(_JAX_MOE_GEMM_DIR "${CMAKE_CURRENT_LIST_DIR}")

set(JAX_MOE_GEMM_GENERIC_SOURCES
  ${_JAX_MOE_GEMM_DIR}/grouped_gemm.cu
  ${_JAX_MOE_GEMM_DIR}/grouped_gemm_generic.cu
)

set(JAX_MOE_GEMM_SM90_SOURCES
  ${_JAX_MOE_GEMM_DIR}/grouped_gemm_sm90_fwd_bf16.cu
  ${_JAX_MOE_GEMM_DIR}/grouped_gemm_sm90_fwd_f16.cu
  ${_JAX_MOE_GEMM_DIR}/grouped_gemm_sm90_dlhs_bf16.cu
  ${_JAX_MOE_GEMM_DIR}/grouped_gemm_sm90_dlhs_f16.cu
  ${_JAX_MOE_GEMM_DIR}/grouped_gemm_sm90_drhs_bf16.cu
  ${_JAX_MOE_GEMM_DIR}/grouped_gemm_sm90_drhs_f16.cu
)

# Sets OUT_VAR to the CUTLASS include directories ("<root>/include;<root>/tools/util/include"), or
# to "" when none is found. Looks at, in order:
#   1. the CMake variable or environment variable JAX_MOE_CUTLASS_DIR: a folder holding include/
#      and tools/util/include/ (a CUTLASS checkout, or the `source` folder of the nvidia-cutlass
#      wheel);
#   2. the nvidia-cutlass wheel of ${Python_EXECUTABLE} (or ${Python3_EXECUTABLE}), located with
#      importlib.util.find_spec, which does not import the package (its dependencies may be
#      missing).
function(jax_moe_find_cutlass OUT_VAR)
  set(_roots "")
  if(DEFINED JAX_MOE_CUTLASS_DIR AND NOT "${JAX_MOE_CUTLASS_DIR}" STREQUAL "")
    list(APPEND _roots "${JAX_MOE_CUTLASS_DIR}")
  elseif(DEFINED ENV{JAX_MOE_CUTLASS_DIR} AND NOT "$ENV{JAX_MOE_CUTLASS_DIR}" STREQUAL "")
    list(APPEND _roots "$ENV{JAX_MOE_CUTLASS_DIR}")
  endif()

  set(_python "")
  if(Python_EXECUTABLE)
    set(_python "${Python_EXECUTABLE}")
  elseif(Python3_EXECUTABLE)
    set(_python "${Python3_EXECUTABLE}")
  endif()
  if(_python)
    execute_process(
      COMMAND "${_python}" -c
        "import importlib.util,os; s=importlib.util.find_spec('cutlass_library'); print(os.path.join(s.submodule_search_locations[0],'source'))"
      OUTPUT_VARIABLE _wheel_source
      OUTPUT_STRIP_TRAILING_WHITESPACE
      RESULT_VARIABLE _rc
      ERROR_QUIET)
    if(_rc EQUAL 0 AND NOT "${_wheel_source}" STREQUAL "")
      list(APPEND _roots "${_wheel_source}")
    endif()
  endif()

  foreach(_root IN LISTS _roots)
    get_filename_component(_root "${_root}" ABSOLUTE)
    if(EXISTS "${_root}/include/cutlass/gemm/kernel/sm90_gemm_array_tma_warpspecialized_cooperative.hpp"
       AND EXISTS "${_root}/tools/util/include/cutlass/util/packed_stride.hpp")
      message(STATUS "jax_moe: CUTLASS found at ${_root}")
      set(${OUT_VAR} "${_root}/include;${_root}/tools/util/include" PARENT_SCOPE)
      return()
    endif()
    message(WARNING "jax_moe: ${_root} holds no CUTLASS (include/ and tools/util/include/)")
  endforeach()
  message(STATUS "jax_moe: CUTLASS not found (set JAX_MOE_CUTLASS_DIR or pip install nvidia-cutlass); "
                 "grouped GEMM uses the generic CUDA kernels only")
  set(${OUT_VAR} "" PARENT_SCOPE)
endfunction()

# Creates OBJECT library NAME from JAX_MOE_GEMM_SM90_SOURCES, compiled for sm_90a only.
function(jax_moe_add_gemm_sm90_objects NAME CUTLASS_INCLUDE_DIRS)
  add_library(${NAME} OBJECT ${JAX_MOE_GEMM_SM90_SOURCES})
  set_target_properties(${NAME} PROPERTIES
    CUDA_ARCHITECTURES OFF
    POSITION_INDEPENDENT_CODE ON
    CUDA_STANDARD 17
    CUDA_STANDARD_REQUIRED ON)
  target_include_directories(${NAME} PRIVATE "${_JAX_MOE_GEMM_DIR}" ${CUTLASS_INCLUDE_DIRS})
  target_compile_options(${NAME} PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:-gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr>)
  target_compile_definitions(${NAME} PRIVATE NDEBUG)
endfunction()
