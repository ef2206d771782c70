// Operator schemas for the prunepath library, and the Python module stub `prunepath._C`.
// Kernels register against these schemas in csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing prunepath._C loads this shared object, which runs the static registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(prunepath, m) {
  // logits [T, E] float; budget [T] float32 -> bool mask [T, E]
  m.def("route(Tensor logits, Tensor budget, int min_experts, int max_experts) -> Tensor");
  // x [T, d]; w_gate/w_up [F, d] (nn.Linear layout); w_down [d, F]; mask [T, E] bool -> [T, d]
  m.def(
      "routed_ffn(Tensor x, Tensor? w_gate, Tensor w_up, Tensor w_down, Tensor mask, "
      "str activation, Tensor? b_up, Tensor? b_down) -> Tensor");
  // the same with w_down_t = W_down^T [F, d] contiguous (expert blocks are contiguous rows)
  m.def(
      "routed_ffn_packed(Tensor x, Tensor? w_gate, Tensor w_up, Tensor w_down_t, Tensor mask, "
      "str activation, Tensor? b_up, Tensor? b_down) -> Tensor");
  // router projection + route in one call (CPU kernel: csrc/cpu/router_route.cpp):
  // x [T, d]; w_router [E or R, d] (dtype of x); low rank: w_router_out [E, R], act in
  // {none, gelu, gelu_tanh, relu, silu}; budget [T] float32 -> bool mask [T, E]
  m.def(
      "router_route(Tensor x, Tensor w_router, Tensor? b_router, Tensor? w_router_out, "
      "Tensor? b_router_out, str hidden_activation, Tensor budget, int min_experts, "
      "int max_experts) -> Tensor");
  // router_route, then routed_ffn (packed_down = false: w_down [d, F]) or routed_ffn_packed
  // (packed_down = true: w_down = W_down^T [F, d]) on its mask, as one op -> (y [T, d], mask)
  // (CPU kernel: csrc/cpu/router_routed_ffn.cpp)
  m.def(
      "router_routed_ffn(Tensor x, Tensor w_router, Tensor? b_router, Tensor? w_router_out, "
      "Tensor? b_router_out, str hidden_activation, Tensor budget, int min_experts, "
      "int max_experts, Tensor? w_gate, Tensor w_up, Tensor w_down, str activation, "
      "Tensor? b_up, Tensor? b_down, bool packed_down) -> (Tensor, Tensor)");
  // x [T, d]; weight [N, d] (nn.Linear layout, dtype of x); bias [N] -> x weight^T + bias [T, N]
  // (CPU kernel for decode steps: csrc/cpu/linear.cpp)
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}
