// Bindings of the ALiBi flash attention (csrc/attention/attention.h): validate every argument with a
// ValueError that names it, fill the params from TensorViews, then run the CPU kernel for host
// tensors or the CUDA kernel (on the caller's stream) for device tensors. Workspaces are allocated
// and zero-filled by the caller (mpt_kernels/ops/attention.py) from the *_workspace_size queries.
#include <cmath>
#include <cstdint>
#include <optional>

#include "attention/attention.h"
#include "bindings.h"

namespace py = pybind11;

namespace mptk {
namespace {

using OptView = std::optional<TensorView>;

constexpr int kCpuMaxHeadDim = 256;

int64_t checked_int(int64_t v, const char* name, const char* what) {
  MPTK_CHECK_ARG(v >= 0 && v <= INT32_MAX, name, what, " must be in [0, 2^31), got ", v);
  return v;
}

// Everything but outputs and workspace: validates q, k, v, slopes, cu_seqlens and fills p.
void fill_inputs(AttentionFwdParams& p, const TensorView& q, const TensorView& k, const TensorView& v,
                 const OptView& slopes, const OptView& cu_q, const OptView& cu_k, int64_t max_sq, int64_t max_sk,
                 double softmax_scale, bool causal) {
  check_same_device(q, "q", k, "k");
  check_same_device(q, "q", v, "v");
  if (q.is_cuda()) {
#ifdef MPTK_WITH_CUDA
    MPTK_CHECK_ARG(q.dtype != DType::Float32, "q", "float32 on CUDA: the CUDA attention kernels take float16 or ",
                   "bfloat16; run the model under torch.autocast(\"cuda\", dtype=torch.bfloat16) or convert it ",
                   "(model.to(torch.bfloat16))");
    check_dtype(q, "q", {DType::Float16, DType::BFloat16});
#else
    throw_no_cuda("alibi_attention");
#endif
  } else {
    check_dtype(q, "q", {DType::Float32, DType::BFloat16, DType::Float16});
  }
  MPTK_CHECK_ARG(k.dtype == q.dtype, "k", "dtype ", dtype_name(k.dtype), " does not match q's ", dtype_name(q.dtype));
  MPTK_CHECK_ARG(v.dtype == q.dtype, "v", "dtype ", dtype_name(v.dtype), " does not match q's ", dtype_name(q.dtype));

  const bool varlen = cu_q.has_value() || cu_k.has_value();
  MPTK_CHECK_ARG(cu_q.has_value() == cu_k.has_value(), cu_q ? "cu_seqlens_k" : "cu_seqlens_q",
                 "cu_seqlens_q and cu_seqlens_k must be given together");
  const int nd = varlen ? 3 : 4;
  check_ndim(q, "q", nd);
  check_ndim(k, "k", nd);
  check_ndim(v, "v", nd);
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");

  const int64_t D = q.size(-1), H = q.size(-2), Hkv = k.size(-2);
  MPTK_CHECK_ARG(k.size(-1) == D, "k", "head_dim ", k.size(-1), " does not match q's head_dim ", D);
  MPTK_CHECK_ARG(v.size(-1) == D, "v", "head_dim ", v.size(-1), " does not match q's head_dim ", D);
  for (int i = 0; i < nd; ++i)
    MPTK_CHECK_ARG(v.shape[i] == k.shape[i], "v", "shape ", v.shape_str(), " must equal k's shape ", k.shape_str());
  MPTK_CHECK_ARG(H > 0, "q", "n_heads must be positive, got shape ", q.shape_str());
  MPTK_CHECK_ARG(Hkv > 0 && H % Hkv == 0, "k", "n_kv_heads=", Hkv, " must divide q's n_heads=", H,
                 " (MHA, GQA or MQA)");
  MPTK_CHECK_ARG(D > 0, "q", "head_dim must be positive");
  if (q.is_cuda()) {
#ifdef MPTK_WITH_CUDA
    MPTK_CHECK_ARG(alibi_attention_cuda_supports_head_dim(static_cast<int>(D)), "q", "head_dim ", D,
                   " is not supported by the CUDA kernels of this build");
#endif
  } else {
    MPTK_CHECK_ARG(D <= kCpuMaxHeadDim, "q", "head_dim ", D, " is not supported on the CPU (at most ",
                   kCpuMaxHeadDim, ")");
  }

  p.q = q.data;
  p.k = k.data;
  p.v = v.data;
  p.dtype = q.dtype;
  p.n_heads = static_cast<int>(checked_int(H, "q", "n_heads"));
  p.n_kv_heads = static_cast<int>(Hkv);
  p.head_dim = static_cast<int>(D);
  p.causal = causal;
  MPTK_CHECK_ARG(std::isfinite(softmax_scale), "softmax_scale", "must be finite, got ", softmax_scale);
  p.softmax_scale = static_cast<float>(softmax_scale);

  if (!varlen) {
    MPTK_CHECK_ARG(k.size(0) == q.size(0), "k", "batch ", k.size(0), " does not match q's batch ", q.size(0));
    p.batch = static_cast<int>(checked_int(q.size(0), "q", "batch"));
    p.seqlen_q = static_cast<int>(checked_int(q.size(1), "q", "seqlen_q"));
    p.seqlen_k = static_cast<int>(checked_int(k.size(1), "k", "seqlen_k"));
    MPTK_CHECK_ARG(!causal || p.seqlen_q <= p.seqlen_k, "q", "seqlen_q=", p.seqlen_q, " > seqlen_k=", p.seqlen_k,
                   " is not allowed with causal=True (causal rows are aligned to the bottom-right)");
    p.q_batch_stride = q.stride[0], p.q_row_stride = q.stride[1], p.q_head_stride = q.stride[2];
    p.k_batch_stride = k.stride[0], p.k_row_stride = k.stride[1], p.k_head_stride = k.stride[2];
    p.v_batch_stride = v.stride[0], p.v_row_stride = v.stride[1], p.v_head_stride = v.stride[2];
  } else {
    const TensorView& cq = *cu_q;
    const TensorView& ck = *cu_k;
    check_same_device(q, "q", cq, "cu_seqlens_q");
    check_same_device(q, "q", ck, "cu_seqlens_k");
    check_dtype(cq, "cu_seqlens_q", {DType::Int32});
    check_dtype(ck, "cu_seqlens_k", {DType::Int32});
    check_ndim(cq, "cu_seqlens_q", 1);
    check_ndim(ck, "cu_seqlens_k", 1);
    check_contiguous(cq, "cu_seqlens_q");
    check_contiguous(ck, "cu_seqlens_k");
    MPTK_CHECK_ARG(cq.size(0) >= 1, "cu_seqlens_q", "must have batch + 1 >= 1 entries");
    MPTK_CHECK_ARG(ck.size(0) == cq.size(0), "cu_seqlens_k", "has ", ck.size(0), " entries but cu_seqlens_q has ",
                   cq.size(0));
    p.batch = static_cast<int>(checked_int(cq.size(0) - 1, "cu_seqlens_q", "batch"));
    p.seqlen_q = static_cast<int>(checked_int(max_sq, "max_seqlen_q", "max_seqlen_q"));
    p.seqlen_k = static_cast<int>(checked_int(max_sk, "max_seqlen_k", "max_seqlen_k"));
    const int64_t total_q = checked_int(q.size(0), "q", "total tokens");
    const int64_t total_k = checked_int(k.size(0), "k", "total tokens");
    if (!q.is_cuda()) {
      // Host memory: check the offsets themselves. (The Python layer checks device offsets.)
      const int32_t* a = cq.ptr<int32_t>();
      const int32_t* c = ck.ptr<int32_t>();
      MPTK_CHECK_ARG(a[0] >= 0, "cu_seqlens_q", "must start at a non-negative offset, got ", a[0]);
      MPTK_CHECK_ARG(c[0] >= 0, "cu_seqlens_k", "must start at a non-negative offset, got ", c[0]);
      for (int b = 0; b < p.batch; ++b) {
        const int64_t lq = static_cast<int64_t>(a[b + 1]) - a[b], lk = static_cast<int64_t>(c[b + 1]) - c[b];
        MPTK_CHECK_ARG(lq >= 0, "cu_seqlens_q", "must be non-decreasing (entry ", b + 1, " is ", a[b + 1],
                       " after ", a[b], ")");
        MPTK_CHECK_ARG(lk >= 0, "cu_seqlens_k", "must be non-decreasing (entry ", b + 1, " is ", c[b + 1],
                       " after ", c[b], ")");
        MPTK_CHECK_ARG(lq <= max_sq, "max_seqlen_q", "is ", max_sq, " but sequence ", b, " has ", lq, " queries");
        MPTK_CHECK_ARG(lk <= max_sk, "max_seqlen_k", "is ", max_sk, " but sequence ", b, " has ", lk, " keys");
        MPTK_CHECK_ARG(!causal || lq <= lk, "cu_seqlens_q", "sequence ", b, " has seqlen_q=", lq, " > seqlen_k=", lk,
                       ", not allowed with causal=True");
      }
      MPTK_CHECK_ARG(a[p.batch] <= total_q, "cu_seqlens_q", "last offset ", a[p.batch], " exceeds q's ", total_q,
                     " rows");
      MPTK_CHECK_ARG(c[p.batch] <= total_k, "cu_seqlens_k", "last offset ", c[p.batch], " exceeds k's ", total_k,
                     " rows");
    }
    p.cu_seqlens_q = cq.ptr<const int32_t>();
    p.cu_seqlens_k = ck.ptr<const int32_t>();
    p.q_row_stride = q.stride[0], p.q_head_stride = q.stride[1];
    p.k_row_stride = k.stride[0], p.k_head_stride = k.stride[1];
    p.v_row_stride = v.stride[0], p.v_head_stride = v.stride[1];
  }

  if (slopes) {
    const TensorView& s = *slopes;
    check_same_device(q, "q", s, "alibi_slopes");
    MPTK_CHECK_ARG(s.dtype == DType::Float32, "alibi_slopes", "must have dtype float32, got ", dtype_name(s.dtype));
    if (s.ndim == 1) {
      MPTK_CHECK_ARG(s.size(0) == H, "alibi_slopes", "shape ", s.shape_str(), " must be (n_heads,) = (", H,
                     ",) or (batch, n_heads)");
      p.alibi_slopes_batch_stride = 0;
    } else {
      MPTK_CHECK_ARG(s.ndim == 2 && s.size(0) == p.batch && s.size(1) == H, "alibi_slopes", "shape ", s.shape_str(),
                     " must be (n_heads,) = (", H, ",) or (batch, n_heads) = (", p.batch, ", ", H, ")");
      p.alibi_slopes_batch_stride = s.stride[0];
    }
    check_last_dim_contiguous(s, "alibi_slopes");
    p.alibi_slopes = s.ptr<const float>();
  }
}

void check_like(const TensorView& t, const char* name, const TensorView& ref, const char* refname) {
  check_same_device(ref, refname, t, name);
  MPTK_CHECK_ARG(t.dtype == ref.dtype, name, "dtype ", dtype_name(t.dtype), " must match ", refname, "'s ",
                 dtype_name(ref.dtype));
  bool same = t.ndim == ref.ndim;
  for (int i = 0; same && i < t.ndim; ++i) same = t.shape[i] == ref.shape[i];
  MPTK_CHECK_ARG(same, name, "shape ", t.shape_str(), " must equal ", refname, "'s shape ", ref.shape_str());
  check_last_dim_contiguous(t, name);
}

void strides3(const TensorView& t, bool varlen, int64_t& bs, int64_t& rs, int64_t& hs) {
  if (varlen) {
    bs = 0, rs = t.stride[0], hs = t.stride[1];
  } else {
    bs = t.stride[0], rs = t.stride[1], hs = t.stride[2];
  }
}

void fill_out_lse(AttentionFwdParams& p, const TensorView& q, const TensorView& out, const OptView& lse,
                  bool lse_required) {
  const bool varlen = p.is_varlen();
  check_like(out, "out", q, "q");
  p.out = out.data;
  strides3(out, varlen, p.out_batch_stride, p.out_row_stride, p.out_head_stride);
  MPTK_CHECK_ARG(lse.has_value() || !lse_required, "lse", "is required");
  if (!lse) return;
  const TensorView& l = *lse;
  check_same_device(q, "q", l, "lse");
  MPTK_CHECK_ARG(l.dtype == DType::Float32, "lse", "must have dtype float32, got ", dtype_name(l.dtype));
  if (varlen) {
    MPTK_CHECK_ARG(l.ndim == 2 && l.size(0) == p.n_heads && l.size(1) == q.size(0), "lse", "shape ", l.shape_str(),
                   " must be (n_heads, total_q) = (", p.n_heads, ", ", q.size(0), ")");
    p.lse_batch_stride = 0;
    p.lse_head_stride = l.stride[0];
  } else {
    MPTK_CHECK_ARG(l.ndim == 3 && l.size(0) == p.batch && l.size(1) == p.n_heads && l.size(2) == p.seqlen_q, "lse",
                   "shape ", l.shape_str(), " must be (batch, n_heads, seqlen_q) = (", p.batch, ", ", p.n_heads, ", ",
                   p.seqlen_q, ")");
    p.lse_batch_stride = l.stride[0];
    p.lse_head_stride = l.stride[1];
  }
  check_last_dim_contiguous(l, "lse");
  p.lse = l.ptr<float>();
}

void fill_workspace(AttentionFwdParams& p, const OptView& ws, size_t needed, const TensorView& q) {
  if (needed == 0 && !ws) return;
  MPTK_CHECK_ARG(ws.has_value(), "workspace", "is required (", needed, " bytes; see the *_workspace_size query)");
  check_same_device(q, "q", *ws, "workspace");
  check_contiguous(*ws, "workspace");
  const size_t bytes = static_cast<size_t>(ws->numel()) * dtype_size(ws->dtype);
  MPTK_CHECK_ARG(bytes >= needed, "workspace", "has ", bytes, " bytes, needs ", needed);
  p.workspace = ws->data;
  p.workspace_bytes = bytes;
}

size_t fwd_workspace_size(const AttentionFwdParams& p, bool cuda) {
  if (cuda) {
#ifdef MPTK_WITH_CUDA
    return alibi_attention_fwd_workspace_size_cuda(p);
#else
    throw_no_cuda("alibi_attention");
#endif
  }
  return alibi_attention_fwd_workspace_size_cpu(p);
}

size_t bwd_workspace_size(const AttentionBwdParams& p, bool cuda) {
  if (cuda) {
#ifdef MPTK_WITH_CUDA
    return alibi_attention_bwd_workspace_size_cuda(p);
#else
    throw_no_cuda("alibi_attention");
#endif
  }
  return alibi_attention_bwd_workspace_size_cpu(p);
}

void attention_fwd(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                   const OptView& lse, const OptView& slopes, const OptView& cu_q, const OptView& cu_k, int64_t max_sq,
                   int64_t max_sk, double softmax_scale, bool causal, const OptView& workspace, uint64_t stream) {
  AttentionFwdParams p;
  fill_inputs(p, q, k, v, slopes, cu_q, cu_k, max_sq, max_sk, softmax_scale, causal);
  fill_out_lse(p, q, out, lse, false);
  fill_workspace(p, workspace, fwd_workspace_size(p, q.is_cuda()), q);
  if (q.is_cuda()) {
#ifdef MPTK_WITH_CUDA
    CudaDeviceGuard guard(q.device);
    alibi_attention_fwd_cuda(p, as_stream(stream));
#endif
    return;
  }
  py::gil_scoped_release nogil;
  alibi_attention_fwd_cpu(p);
}

void attention_bwd(const TensorView& dout, const TensorView& q, const TensorView& k, const TensorView& v,
                   const TensorView& out, const TensorView& lse, const TensorView& dq, const TensorView& dk,
                   const TensorView& dv, const OptView& slopes, const OptView& cu_q, const OptView& cu_k,
                   int64_t max_sq, int64_t max_sk, double softmax_scale, bool causal, const OptView& workspace,
                   uint64_t stream) {
  AttentionBwdParams p;
  fill_inputs(p, q, k, v, slopes, cu_q, cu_k, max_sq, max_sk, softmax_scale, causal);
  fill_out_lse(p, q, out, lse, true);
  const bool varlen = p.is_varlen();
  check_like(dout, "dout", q, "q");
  check_like(dq, "dq", q, "q");
  check_like(dk, "dk", k, "k");
  check_like(dv, "dv", v, "v");
  p.dout = dout.data;
  p.dq = dq.data;
  p.dk = dk.data;
  p.dv = dv.data;
  strides3(dout, varlen, p.dout_batch_stride, p.dout_row_stride, p.dout_head_stride);
  strides3(dq, varlen, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride);
  strides3(dk, varlen, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride);
  strides3(dv, varlen, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride);
  fill_workspace(p, workspace, bwd_workspace_size(p, q.is_cuda()), q);
  if (q.is_cuda()) {
#ifdef MPTK_WITH_CUDA
    CudaDeviceGuard guard(q.device);
    alibi_attention_bwd_cuda(p, as_stream(stream));
#endif
    return;
  }
  py::gil_scoped_release nogil;
  alibi_attention_bwd_cpu(p);
}

// The forward and backward workspace queries take the same inputs and differ only in the params
// type and the size function.
template <typename Params, size_t (*SizeFn)(const Params&, bool)>
void def_workspace_size(py::module_& m, const char* name, const char* doc) {
  m.def(
      name,
      [](const TensorView& q, const TensorView& k, const TensorView& v, const OptView& slopes, const OptView& cu_q,
         const OptView& cu_k, int64_t max_sq, int64_t max_sk, double softmax_scale, bool causal) {
        Params p;
        fill_inputs(p, q, k, v, slopes, cu_q, cu_k, max_sq, max_sk, softmax_scale, causal);
        return SizeFn(p, q.is_cuda());
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("alibi_slopes"), py::arg("cu_seqlens_q"),
      py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("softmax_scale"),
      py::arg("causal"), doc);
}

void register_attention(py::module_& m) {
  def_workspace_size<AttentionFwdParams, fwd_workspace_size>(
      m, "attention_fwd_workspace_size",
      "Bytes of zero-filled workspace alibi_attention_fwd needs for these arguments (0: none).");
  def_workspace_size<AttentionBwdParams, bwd_workspace_size>(
      m, "attention_bwd_workspace_size", "Bytes of zero-filled workspace alibi_attention_bwd needs for these arguments.");
  m.def("attention_fwd", &attention_fwd, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("alibi_slopes"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"),
        py::arg("max_seqlen_k"), py::arg("softmax_scale"), py::arg("causal"), py::arg("workspace"),
        py::arg("stream") = 0,
        "ALiBi flash attention forward: writes out (like q) and, if given, lse (float32). Varlen when "
        "cu_seqlens_q/k are given.");
  m.def("attention_bwd", &attention_bwd, py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("alibi_slopes"), py::arg("cu_seqlens_q"),
        py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("softmax_scale"),
        py::arg("causal"), py::arg("workspace"), py::arg("stream") = 0,
        "ALiBi flash attention backward: writes dq, dk, dv (dk, dv summed over each KV group's query heads).");
  m.def(
      "attention_cuda_supports_head_dim",
      [](int head_dim) {
#ifdef MPTK_WITH_CUDA
        return alibi_attention_cuda_supports_head_dim(head_dim);
#else
        (void)head_dim;
        return false;
#endif
      },
      py::arg("head_dim"), "Whether the CUDA kernels of this build handle this head dim.");
  m.attr("attention_cpu_max_head_dim") = kCpuMaxHeadDim;
}

}  // namespace
}  // namespace mptk

MPTK_REGISTER_BINDINGS(attention, mptk::register_attention);
