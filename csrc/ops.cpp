// Every safeattn op schema lives here; backends only add TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing safeattn._C loads this library, which registers the ops below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(safeattn, m) {
  // q [B,Hq,Tq,D], k/v [B,Hkv,Tk,D], intervals [B,Tq,NI,2] int32 half-open key ranges.
  // Returns out [B,Hq,Tq,D]; a row whose ranges are all empty gives zeros.
  m.def(
      "interval_attention(Tensor q, Tensor k, Tensor v, Tensor intervals, "
      "float? scale=None, float? softcap=None) -> Tensor");
  // Training forward: also returns the row log-sum-exp [B,Hq,Tq] float32 (-inf for empty rows)
  // that the backward recomputes the softmax from.
  m.def(
      "interval_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor intervals, "
      "float? scale=None, float? softcap=None) -> (Tensor, Tensor)");
  // Flash-style backward: (dq, dk, dv) from the saved out and lse; never builds a T x T mask.
  m.def(
      "interval_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor intervals, float? scale=None, float? softcap=None) "
      "-> (Tensor, Tensor, Tensor)");
  // interval_attention against a paged KV cache, read in place: key column j < Tc of row b
  // is token slots[b,j] % P of page slots[b,j] / P, channel d of kv head h at
  // cache[page][h][key_offsets[token][d]] (values: value_offsets); columns Tc.. are
  // k_new/v_new [B,Hkv,Tn,D]. cache [pages,Hkv,S]; offsets [P,D] int64; intervals over Tc+Tn.
  m.def(
      "paged_interval_attention(Tensor q, Tensor cache, Tensor slots, Tensor key_offsets, "
      "Tensor value_offsets, Tensor k_new, Tensor v_new, Tensor intervals, float? scale=None, "
      "float? softcap=None) -> Tensor");
  // One strategic-decoding step for every row: head, state machine, next probe window.
  // Returns p [B] float32 and the next probe's intervals [B,2,2] int32 (q_span, window).
  m.def(
      "safety_step(Tensor h, Tensor weight, Tensor bias, Tensor(a!) mode, "
      "Tensor(b!) consec, Tensor(c!) s_t, Tensor(d!) step, Tensor(e!) refused, "
      "Tensor active, Tensor q_span, Tensor resp_start, float theta, int tau, "
      "int r1, int r2, int r3) -> (Tensor, Tensor)");
}
