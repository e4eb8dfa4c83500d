// Graph-side hooks that patches/ call from inside llama.cpp (compiled into libllama).
#pragma once

#include "ggml.h"

#define PYASL_SCORES_NAME "pyasl_scores"

// Window-attention probabilities for the last n_window queries of the ubatch, from the
// already-permuted q [d, n_tokens, n_head, n_stream] and cache view k [d, n_kv, n_head_kv, n_stream]:
// softmax((Q_win K^T) [softcap] [+ kq_b] [+ mask] * kq_scale [alibi], sinks).
//   mode 0: summed over the window queries, F32 [n_kv, n_head]
//   mode 1: full, F32 [n_kv, n_window, n_head]
//   mode 2: the raw q.k products (no scale, mask or softmax: GemFilter's score), summed, [n_kv, n_head]
// llama-graph builds them here with flash attention on (its probabilities are never materialised) and
// for mode 2; otherwise it reads them from the attention's own (pyasl_window_scores_from_probs).
// Returns nullptr (scores off for this layer) when the ubatch is shorter than the window or the
// layout is not supported (several streams).
ggml_tensor * pyasl_build_window_scores(
        ggml_context * ctx,
        ggml_tensor * q,
        ggml_tensor * k,
        ggml_tensor * kq_b,
        ggml_tensor * kq_mask,
        ggml_tensor * sinks,
        float kq_scale,
        float max_alibi_bias,
        float softcap,
        int32_t n_window,
        int32_t mode);

// The same scores (modes 0 and 1) read from probabilities the attention computed anyway: `probs` is
// softmax(K^T Q) of the whole ubatch, [n_kv, n_tokens, n_head, n_stream] (flash attention off). No
// second Q.K^T, and the scores are exactly the probabilities the layer attended with.
ggml_tensor * pyasl_window_scores_from_probs(
        ggml_context * ctx,
        ggml_tensor * probs,
        int32_t n_window,
        int32_t mode);

// Whether a KV cache created now should keep every layer's K/V in one layer's tensors
// (pyasl_set_kv_one_layer; read by the llama_kv_cache constructor, patches/0005).
bool pyasl_kv_one_layer_requested(void);
