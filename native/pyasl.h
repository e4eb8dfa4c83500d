// pyasl C API, compiled into libllama next to llama.cpp. Called from Python through ctypes
// (pyasl/_native.py). Every function that can fail returns a negative code and leaves a message
// in pyasl_last_error(); none of them aborts on bad input, and a refused call leaves the cache as it
// was (every layer is checked before the first write). Sequence ids must be < the context's n_seq_max;
// the KV calls need a cache whose used cells all belong to that one sequence (one stream).
#pragma once

#include "llama.h"

#include <stdbool.h>
#include <stdint.h>

#if defined(_WIN32)
#    define PYASL_API __declspec(dllexport)
#else
#    define PYASL_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define PYASL_ABI_VERSION 4

enum pyasl_status {
    PYASL_OK              =  0,
    PYASL_ERR_ARG         = -1, // an argument is out of range / not sorted / wrong size
    PYASL_ERR_UNSUPPORTED = -2, // memory type or layout this version cannot handle
    PYASL_ERR_STATE       = -3, // the cache is in a state that forbids the call (shared cells, pending shift)
    PYASL_ERR_BACKEND     = -4, // a backend copy failed
};

PYASL_API int32_t      pyasl_abi_version(void);
PYASL_API const char * pyasl_last_error(void);

// ---- window-attention scores ------------------------------------------------------------
// Arm (n_window > 0) or disarm (0) the score outputs for the following llama_decode calls.
// mode 0: per layer [n_kv, n_head] softmax attention summed over the window queries; mode 1: the
// same unsummed, [n_kv, n_window, n_head]; mode 2: raw q.k products (no scale, mask or softmax:
// GemFilter's score) summed over the window queries, [n_kv, n_head].
// The window is the last n_window tokens of each ubatch; ubatches shorter than that give no scores.
PYASL_API int32_t pyasl_set_score_window(struct llama_context * ctx, int32_t n_window, int32_t mode);

// Host-side store filled by the eval callback. Install pyasl_capture_eval_cb as cb_eval with the
// capture as cb_eval_user_data when creating the context. By default it captures the tensors
// named "pyasl_scores-<il>"; more name prefixes can be added (e.g. "kq_soft_max" as a test oracle).
typedef struct pyasl_capture pyasl_capture;

PYASL_API pyasl_capture * pyasl_capture_new(void);
PYASL_API void            pyasl_capture_free(pyasl_capture * cap);
PYASL_API bool            pyasl_capture_eval_cb(struct ggml_tensor * t, bool ask, void * user_data);
PYASL_API void            pyasl_capture_clear(pyasl_capture * cap);
PYASL_API void            pyasl_capture_set_enabled(pyasl_capture * cap, bool enabled);
PYASL_API int32_t         pyasl_capture_add_prefix(pyasl_capture * cap, const char * prefix);
// Early exit: stop computing the graph at the first node of layer stop_layer + 1 (name suffix
// "-<il>" with il > stop_layer); -1 turns it off. The logits of such a decode are meaningless and
// layers past stop_layer keep stale K/V: for a first pass whose cache is thrown away (GemFilter).
// With several backend splits only the current split stops.
PYASL_API void            pyasl_capture_set_stop_layer(pyasl_capture * cap, int32_t stop_layer);
PYASL_API int32_t         pyasl_capture_count(const pyasl_capture * cap);
PYASL_API const char *    pyasl_capture_name(const pyasl_capture * cap, int32_t i);
// layer index parsed from the "-<il>" suffix of the name, -1 if none
PYASL_API int32_t         pyasl_capture_layer(const pyasl_capture * cap, int32_t i);
PYASL_API int32_t         pyasl_capture_shape(const pyasl_capture * cap, int32_t i, int64_t * ne4);
// copies min(n, numel) floats; returns numel or a negative error
PYASL_API int64_t         pyasl_capture_read(const pyasl_capture * cap, int32_t i, float * dst, int64_t n);

// Let llama_decode accept batches whose positions skip values (still after the cached ones), to
// re-prefill kept tokens at their original positions.
PYASL_API int32_t pyasl_set_allow_pos_gaps(struct llama_context * ctx, bool allow);

// ---- layer-major prefill --------------------------------------------------------------------
// Run only layers [begin, end) of the model in the following decodes (begin = 0, end = n_layer
// restores the whole model). With begin > 0 the batch carries hidden states (llama_batch.embd,
// n_embd floats per token, no embedding scale); with end < n_layer the hidden state after layer
// end - 1 of every batch token is exposed as llama.cpp's "layer input" end (see
// llama_set_embeddings_layer_inp / llama_get_embeddings_layer_inp) and the logits are meaningless.
// Supported architectures: llama, qwen2, qwen3, gemma3, phi3, mistral3; others refuse.
PYASL_API int32_t pyasl_set_layer_range(struct llama_context * ctx, int32_t begin, int32_t end);
// A batch whose positions the sequence already holds writes its K/V into those same cells
// (recomputing a layer for positions cached by an earlier pass). Also allows position gaps.
// Sliding-window models: only the base (global) cache reuses cells. Turning reuse on starts a new
// pass: the sliding-window cache is emptied, and the pass must decode its positions in the same
// ubatches, in the same order, as the pass that filled the cache; it then refills the SWA cache
// into the same cells (each pass's SWA layers see exactly what an ordinary prefill shows them).
PYASL_API int32_t pyasl_set_reuse_cells(struct llama_context * ctx, bool reuse);
// Expose (or stop exposing) the input hidden state of layer lid (0..n_layer) for every batch token;
// pyasl_get_hidden returns n_batch x n_embd floats valid until the next decode (NULL if not armed, or
// armed but no decode has run since; rows past the last batch's token count are stale).
PYASL_API int32_t pyasl_set_hidden_output(struct llama_context * ctx, int32_t lid, bool enable);
PYASL_API float * pyasl_get_hidden(struct llama_context * ctx, int32_t lid);

// ---- KV cache ----------------------------------------------------------------------------
typedef struct pyasl_kv_info {
    int32_t n_caches;        // 1 (plain) or 2 (sliding-window model: base + swa)
    int32_t n_stream;
    int32_t v_trans;         // V stored transposed
    int32_t size_base;       // cells allocated in the base (global-attention) cache
    int32_t size_swa;        // cells allocated in the sliding-window cache (0 if none)
    int32_t used_base;       // cells in use
    int32_t used_swa;
    int32_t n_layer_base;    // layers stored in each cache
    int32_t n_layer_swa;
    int64_t cell_bytes_base; // K+V bytes of one cell summed over the cache's layers
    int64_t cell_bytes_swa;
} pyasl_kv_info;

PYASL_API int32_t pyasl_kv_get_info(struct llama_context * ctx, pyasl_kv_info * out);

// Position held by each of the first n_max cells of the cache that model layer il attends to
// (-1 for an empty cell or one of another sequence). Returns the number of cells written.
PYASL_API int32_t pyasl_kv_layer_cell_pos(struct llama_context * ctx, int32_t il, llama_seq_id seq_id,
                                          int32_t * pos_out, int32_t n_max);

// Keep only the listed positions (strictly increasing) of seq_id in the base (global) cache: their
// K/V rows in every layer move to cells 0..n-1, every other cell is freed. Positions are kept, so
// decode continues at seq_pos_max + 1; the last position must be among them.
PYASL_API int32_t pyasl_kv_keep(struct llama_context * ctx, llama_seq_id seq_id, const int32_t * pos, int32_t n);

// Per-(layer, KV head) selection with a uniform count k: pos[(il*n_head_kv + h)*k + i], each
// (il, h) list strictly increasing. Layers not stored in the base cache are ignored (their slice
// must still be present). The cell metadata gets the element-wise max position over all lists.
// Refused for multi-axis RoPE and ALiBi models (cell positions feed the rotation / bias).
PYASL_API int32_t pyasl_kv_keep_per_head(struct llama_context * ctx, llama_seq_id seq_id, const int32_t * pos,
                                         int32_t n_layer, int32_t n_head_kv, int32_t k);

// ---- per-layer KV budgets (patches/0004: per-layer valid-cell masks) -----------------------
// Layer il keeps counts[il] cells: per KV head h its own strictly increasing positions
// pos[off(il) + h*counts[il] + i], off(il) = n_head_kv * (counts[0] + ... + counts[il-1]), packed
// into cells 0..counts[il]-1. The cache keeps P = max(counts) prompt cells; their metadata gets
// strictly increasing positions whose last is the sequence's last position (a list of length P
// must hold it). Layer il then attends to cells [0, counts[il]) of those P cells plus every cell
// decoded later (new tokens are visible to all layers). Every model layer of the base cache needs
// counts[il] >= 1 (n_layer covers them all). Equal counts give exactly pyasl_kv_keep_per_head.
// Plain caches with K and V only (sliding-window, multi-axis RoPE and K-only caches refuse).
PYASL_API int32_t pyasl_kv_keep_per_layer(struct llama_context * ctx, llama_seq_id seq_id, const int32_t * pos,
                                          const int32_t * counts, int32_t n_layer, int32_t n_head_kv);

// Set the per-layer counts again without moving rows (after the cells moved to another context
// with llama_state_seq_set_data, which clears them; so do llama_memory_clear and a seq_rm that
// frees one of the P cells). counts == NULL clears them. With meta_pos (n_meta = P entries, strictly
// increasing, the last the sequence's last position) the cell metadata is first rewritten to
// cells 0..P-1 holding meta_pos, every other cell freed (rows untouched): for a context whose
// cells were filled piecewise (pyasl_kv_copy_cells); all cells in use must lie in [0, P) then.
// Without meta_pos, cells 0..P-1 must already be in use by seq_id.
PYASL_API int32_t pyasl_kv_set_layer_cells(struct llama_context * ctx, llama_seq_id seq_id, const int32_t * counts,
                                           int32_t n_layer, const int32_t * meta_pos, int32_t n_meta);

// The per-layer counts in force: returns P (0 when none are set) and writes min(n_layer, model
// layers) counts (-1 for a layer without a count).
PYASL_API int32_t pyasl_kv_get_layer_cells(struct llama_context * ctx, int32_t * counts_out, int32_t n_layer);

// Give the cells of seq_id the contiguous positions 0..k-1 in their order and rotate their keys
// (llama.cpp's K-shift, applied before returning). Returns k, the next free position. Refused for
// sliding-window caches, models whose cache cannot shift (multi-axis RoPE, ...) and per-layer counts.
PYASL_API int32_t pyasl_kv_renumber(struct llama_context * ctx, llama_seq_id seq_id);

// K+V bytes of one cell of each model layer (0 for a layer without KV cache); returns the number written.
PYASL_API int32_t pyasl_kv_layer_cell_bytes(struct llama_context * ctx, int64_t * out, int32_t n_layer);

// Copy the K/V rows of cells [0, n_cells) of model layers [il_begin, il_end) from src's cache to
// dst's (same model and cache types). Cell metadata of dst is not touched. Sliding-window
// contexts: only the layers of the base (global) cache are copied (see pyasl_kv_copy_cells_swa).
PYASL_API int32_t pyasl_kv_copy_cells(struct llama_context * dst, struct llama_context * src,
                                      int32_t il_begin, int32_t il_end, int32_t n_cells);

// ---- streamed layer-major prefill (patches/0005) --------------------------------------------
// While on, contexts created on this thread store every layer's K/V in the first layer's tensors
// (layers of another shape keep their own): a layer-major prefill's scratch context, whose layer l
// is pruned (pyasl_kv_gather_layer) before layer l + 1 overwrites it, then holds one layer of
// full-prompt K/V instead of all of them. Such a context's whole-cache calls (state save, keep,
// copy of several layers) see only that storage. Turn it off right after creating the context.
PYASL_API void    pyasl_set_kv_one_layer(bool on);
// For model layer il: per KV head h, copy the K/V rows of src's cells holding positions
// pos[h*k + i] (strictly increasing per head; src holds one sequence seq_id) into dst's cells
// 0..k-1, head h's slice. dst's cell metadata is not touched (pyasl_kv_set_cell_positions, or a
// later decode into those cells). Same model, cache types and V layout; no sliding-window caches.
PYASL_API int32_t pyasl_kv_gather_layer(struct llama_context * dst, struct llama_context * src, llama_seq_id seq_id,
                                        int32_t il, const int32_t * pos, int32_t n_head_kv, int32_t k);
// Cells 0..n-1 of the (plain) cache get seq_id and the strictly increasing positions pos, every other
// cell is freed; rows are untouched: for a context filled by pyasl_kv_gather_layer.
PYASL_API int32_t pyasl_kv_set_cell_positions(struct llama_context * ctx, llama_seq_id seq_id, const int32_t * pos,
                                              int32_t n);

// ---- sliding-window models ------------------------------------------------------------------
// Per layer (up to n_max), whether it uses sliding-window attention (llama.cpp's
// hparams.is_swa(il); all false for a model without a sliding window). Returns n_layer.
PYASL_API int32_t pyasl_model_swa_layers(const struct llama_model * model, bool * out, int32_t n_max);
// llama.cpp's llama_swa_type of the model: 0 none, 1 standard, 2 chunked, 3 symmetric.
PYASL_API int32_t pyasl_model_swa_type(const struct llama_model * model);

// pyasl_kv_keep for the sliding-window cache of an iSWA context: keep only the listed positions
// (strictly increasing, the last one = the sequence's last) in cells 0..n-1 of every SWA layer.
PYASL_API int32_t pyasl_kv_keep_swa(struct llama_context * ctx, llama_seq_id seq_id, const int32_t * pos, int32_t n);
// pyasl_kv_copy_cells for the layers of the sliding-window cache (both contexts iSWA).
PYASL_API int32_t pyasl_kv_copy_cells_swa(struct llama_context * dst, struct llama_context * src,
                                          int32_t il_begin, int32_t il_end, int32_t n_cells);

#ifdef __cplusplus
}
#endif
