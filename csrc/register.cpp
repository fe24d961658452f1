// The one registration file of rim_fast._C: CPU (and, in a CUDA build, CUDA) kernels for the rim_fast ops
// whose schemas, fakes and autograd are defined in Python (rim_fast/ops/cpp_update.py), so the ops exist
// even when this extension is not built. Importing rim_fast._C runs these registrations.
#include <Python.h>

#include <torch/library.h>
#include <torch/version.h>

#include <string>

#include "cpu_isa.h"
#include "cpu_pool.h"
#include "outputs.h"
#include "shift.h"
#include "tanh.h"
#include "update_step.h"
#include "winograd.h"

#ifdef RIM_FAST_WITH_CUDA
#include <cuda.h>  // CUDA_VERSION: the toolkit this build compiled against
#endif

// Build facts as strings: RIM_FAST_CUDA_ARCHS is a comma-separated token list from setup.py (sm_80,...,compute_90)
#define RIM_FAST_STRINGIFY(...) #__VA_ARGS__
#define RIM_FAST_XSTRINGIFY(...) RIM_FAST_STRINGIFY(__VA_ARGS__)

// _set_test_hooks(poison: bool, skip_last_write: bool): the test hooks of outputs.h (tests only).
static PyObject* set_test_hooks(PyObject* /*self*/, PyObject* args) {
  int poison = 0;
  int skip_last_write = 0;
  if (!PyArg_ParseTuple(args, "pp", &poison, &skip_last_write)) {
    return nullptr;
  }
  rim_fast::test_hooks().poison.store(poison != 0);
  rim_fast::test_hooks().skip_last_write.store(skip_last_write != 0);
  Py_RETURN_NONE;
}

// _cpu_pool_open() -> bool, _cpu_pool_close(keep), _cpu_pool_release(), _cpu_pool_stats() -> tuple: the CPU
// memory pool of a RIM call (cpu_pool.h; rim_fast/cpu_pool.py). Plain functions, not dispatcher ops: they take no
// tensors and are never traced.
static PyObject* cpu_pool_open(PyObject* /*self*/, PyObject* /*args*/) {
  return PyBool_FromLong(rim_fast::cpu_pool::open() ? 1 : 0);
}

static PyObject* cpu_pool_close(PyObject* /*self*/, PyObject* args) {
  int keep = 0;
  if (!PyArg_ParseTuple(args, "p", &keep)) {
    return nullptr;
  }
  rim_fast::cpu_pool::close(keep != 0);
  Py_RETURN_NONE;
}

static PyObject* cpu_pool_release(PyObject* /*self*/, PyObject* /*args*/) {
  rim_fast::cpu_pool::release();
  Py_RETURN_NONE;
}

static PyObject* cpu_pool_stats(PyObject* /*self*/, PyObject* /*args*/) {
  int64_t out[6];
  rim_fast::cpu_pool::stats(out);
  return Py_BuildValue("(LLLLLL)", static_cast<long long>(out[0]), static_cast<long long>(out[1]),
                       static_cast<long long>(out[2]), static_cast<long long>(out[3]),
                       static_cast<long long>(out[4]), static_cast<long long>(out[5]));
}

// _set_cpu_isa(name: str): the best instruction set rim_fast's CPU loops may use (cpu_isa.h: the Winograd kernels,
// tanh, the shifted sums), "avx512" (the default: the best the CPU has), "avx2" or "plain". rim_fast.ops._cpu sets
// it to torch's CPU capability at import (ATEN_CPU_CAPABILITY caps both); tests change it.
static PyObject* set_cpu_isa(PyObject* /*self*/, PyObject* args) {
  const char* name = nullptr;
  if (!PyArg_ParseTuple(args, "s", &name)) {
    return nullptr;
  }
  const std::string isa(name);
  if (isa != "avx512" && isa != "avx2" && isa != "plain") {
    PyErr_Format(PyExc_ValueError, "_set_cpu_isa: isa must be 'avx512', 'avx2' or 'plain', got '%s'", name);
    return nullptr;
  }
  rim_fast::cpu_max_isa().store(isa == "avx512" ? rim_fast::kIsaAvx512
                                : isa == "avx2" ? rim_fast::kIsaAvx2 : rim_fast::kIsaPlain);
  Py_RETURN_NONE;
}

// _cpu_isa() -> str: the instruction set rim_fast's CPU loops run now ("avx512", "avx2" or "plain").
static PyObject* cpu_isa(PyObject* /*self*/, PyObject* /*args*/) {
  const int isa = rim_fast::cpu_isa();
  return PyUnicode_FromString(isa == rim_fast::kIsaAvx512 ? "avx512" : isa == rim_fast::kIsaAvx2 ? "avx2" : "plain");
}

static PyMethodDef methods[] = {
    {"_cpu_pool_open", cpu_pool_open, METH_NOARGS,
     "_cpu_pool_open() -> bool: open the CPU memory pool (nested opens count); False if it could not be installed."},
    {"_cpu_pool_close", cpu_pool_close, METH_VARARGS,
     "_cpu_pool_close(keep): close one open; the last restores torch's CPU allocator and frees the listed blocks "
     "(with keep, those not listed during this call)."},
    {"_cpu_pool_release", cpu_pool_release, METH_NOARGS,
     "_cpu_pool_release(): free every listed block (nothing while the pool is open)."},
    {"_cpu_pool_stats", cpu_pool_stats, METH_NOARGS,
     "_cpu_pool_stats() -> (depth, listed blocks, listed bytes, hits, misses, blocks in use)."},
    {"_set_test_hooks", set_test_hooks, METH_VARARGS,
     "_set_test_hooks(poison, skip_last_write): NaN-fill kernel outputs before the kernels write them; make the "
     "kernels skip their last element (tests only)."},
    {"_set_cpu_isa", set_cpu_isa, METH_VARARGS,
     "_set_cpu_isa(isa): the best instruction set of rim_fast's CPU loops (the Winograd kernels, tanh, the shifted "
     "sums), 'avx512' (the default: the best the CPU has), 'avx2' or 'plain'; rim_fast sets it to torch's CPU "
     "capability at import."},
    {"_cpu_isa", cpu_isa, METH_NOARGS,
     "_cpu_isa() -> str: the instruction set rim_fast's CPU loops run now: the best the CPU has, up to "
     "_set_cpu_isa's."},
    {nullptr, nullptr, 0, nullptr},
};

// The kernels are exposed by the dispatcher, not pybind11; the module itself only has the test hooks.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // m_name
      "rim_fast C++/CUDA kernels, registered with the PyTorch dispatcher (torch.ops.rim_fast)",  // m_doc
      -1,    // m_size
      methods,
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) {
    return nullptr;
  }
#ifdef RIM_FAST_WITH_CUDA
  const long with_cuda = 1;
  // "13.0" from CUDA_VERSION = 13000
  const std::string cuda_version =
      std::to_string(CUDA_VERSION / 1000) + "." + std::to_string((CUDA_VERSION % 1000) / 10);
#ifdef RIM_FAST_CUDA_ARCHS
  const char* cuda_archs = RIM_FAST_XSTRINGIFY(RIM_FAST_CUDA_ARCHS);
#else
  const char* cuda_archs = "";  // built without setup.py's arch list (unknown)
#endif
#else
  const long with_cuda = 0;
  const std::string cuda_version;
  const char* cuda_archs = "";
#endif
  // rim_fast._C.WITH_CUDA: whether this build registered CUDA kernels (tests check it against the dispatcher);
  // CUDA_VERSION ("13.0", "" without CUDA) and CUDA_ARCHS ("sm_80,sm_86,...,compute_90": sm_* are GPU images,
  // compute_* PTX) say what they were built for (rim_fast._ext decides from them whether a GPU can run them);
  // TORCH_VERSION: the torch (major.minor) whose headers this build compiled against.
  const std::string torch_version = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR);
  if (PyModule_AddIntConstant(module, "WITH_CUDA", with_cuda) != 0 ||
      PyModule_AddStringConstant(module, "CUDA_VERSION", cuda_version.c_str()) != 0 ||
      PyModule_AddStringConstant(module, "CUDA_ARCHS", cuda_archs) != 0 ||
      PyModule_AddStringConstant(module, "TORCH_VERSION", torch_version.c_str()) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

namespace rim_fast {

TORCH_LIBRARY_IMPL(rim_fast, CPU, m) {
  m.impl("preprocess_adam", &preprocess_adam_cpu);
  m.impl("preprocess_rmsprop", &preprocess_rmsprop_cpu);
  m.impl("preprocess_rmsprop_fixed", &preprocess_rmsprop_fixed_cpu);
  m.impl("preprocess_arcsinh", &preprocess_arcsinh_cpu);
  m.impl("update_state", &update_state_cpu);
  m.impl("update_state_loss", &update_state_loss_cpu);
  m.impl("update_state_loss_backward", &update_state_loss_backward_cpu);
  m.impl("tanh", &tanh_cpu);
  m.impl("shift_sum", &shift_sum_cpu);
  m.impl("shift_stack", &shift_stack_cpu);
  m.impl("winograd_conv3d", &winograd_conv3d_cpu);
  m.impl("winograd_conv3d_weight", &winograd_conv3d_weight_cpu);
}

#ifdef RIM_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(rim_fast, CUDA, m) {
  m.impl("preprocess_adam", &preprocess_adam_cuda);
  m.impl("preprocess_rmsprop", &preprocess_rmsprop_cuda);
  m.impl("preprocess_rmsprop_fixed", &preprocess_rmsprop_fixed_cuda);
  m.impl("preprocess_arcsinh", &preprocess_arcsinh_cuda);
  m.impl("update_state", &update_state_cuda);
  m.impl("update_state_loss", &update_state_loss_cuda);
  m.impl("update_state_loss_backward", &update_state_loss_backward_cuda);
}
#endif

}  // namespace rim_fast
