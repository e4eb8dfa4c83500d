// KV-cache rewriting: move kept rows to the front of the cache, per layer and per KV head.
// Rows travel through host memory with ggml_backend_tensor_get/set, so every backend takes the
// same path (one read and one write per layer tensor).
#include "pyasl_common.h"
#include "pyasl-hooks.h"

#include "llama-context.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"
#include "llama-kv-cells.h"
#include "llama-model.h"
#include "llama-arch.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

struct pyasl_access {
    static llama_cparams & cparams(llama_context * ctx) { return ctx->cparams; }
    static bool has_layer_inp(llama_context * ctx, int32_t lid) {
        return (size_t) lid < ctx->embd_layer_inp.size() && ctx->embd_layer_inp[lid].has_data();
    }
    static llama_kv_cells & cells(llama_kv_cache * kv) { return kv->v_cells[0]; }
    static uint32_t & head(llama_kv_cache * kv) { return kv->v_heads[0]; }
    static auto & layers(llama_kv_cache * kv) { return kv->layers; }
    static bool v_trans(const llama_kv_cache * kv) { return kv->v_trans; }
    static uint32_t n_stream(const llama_kv_cache * kv) { return kv->n_stream; }
    static uint32_t n_seq_max(const llama_kv_cache * kv) { return kv->n_seq_max; }
    static bool shares_cells(const llama_kv_cache * kv) { return kv->other != nullptr; }
    static const llama_hparams & hparams(const llama_kv_cache * kv) { return kv->hparams; }
    static int32_t ikv(const llama_kv_cache * kv, int32_t il) {
        auto it = kv->map_layer_ids.find(il);
        return it == kv->map_layer_ids.end() ? -1 : it->second;
    }
};

namespace {

thread_local bool g_kv_one_layer = false; // pyasl_set_kv_one_layer

struct caches {
    llama_kv_cache * base = nullptr;
    llama_kv_cache * swa  = nullptr;
};

int32_t get_caches(llama_context * ctx, caches & out) {
    if (!ctx) {
        PYASL_FAIL(PYASL_ERR_ARG, "null llama_context");
    }
    llama_memory_t mem = ctx->get_memory();
    if (!mem) {
        PYASL_FAIL(PYASL_ERR_UNSUPPORTED, "the context has no memory (KV cache)");
    }
    if (auto * kv = dynamic_cast<llama_kv_cache *>(mem)) {
        out.base = kv;
    } else if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        out.base = iswa->get_base();
        out.swa  = iswa->get_swa();
    } else {
        PYASL_FAIL(PYASL_ERR_UNSUPPORTED,
                   "unsupported memory type: only attention KV caches (plain or sliding-window) can be pruned, "
                   "not recurrent or hybrid memory");
    }
    for (llama_kv_cache * kv : {out.base, out.swa}) {
        if (!kv) {
            continue;
        }
        if (pyasl_access::n_stream(kv) != 1) {
            PYASL_FAIL(PYASL_ERR_UNSUPPORTED, "KV caches with several streams are not supported (use n_seq_max=1 or kv_unified)");
        }
        if (pyasl_access::shares_cells(kv)) {
            PYASL_FAIL(PYASL_ERR_UNSUPPORTED, "KV caches that share cells with another cache are not supported");
        }
    }
    return PYASL_OK;
}

// the caches of two contexts of the same model (a copy from src to dst)
int32_t get_cache_pair(llama_context * dst, llama_context * src, caches & cd, caches & cs, const char * what) {
    int32_t rc;
    if ((rc = get_caches(dst, cd)) != PYASL_OK || (rc = get_caches(src, cs)) != PYASL_OK) {
        return rc;
    }
    if (&dst->get_model() != &src->get_model()) {
        PYASL_FAIL(PYASL_ERR_ARG, std::string(what) + ": the contexts use different models");
    }
    return PYASL_OK;
}

int64_t cell_bytes(llama_kv_cache * kv) {
    int64_t total = 0;
    for (const auto & l : pyasl_access::layers(kv)) {
        total += (int64_t) l.k->nb[1];
        if (l.v) {
            total += (int64_t) ggml_row_size(l.v->type, l.v->ne[0]);
        }
    }
    return total;
}

// check the cache holds exactly one sequence, no pending shift; map position -> cell
int32_t check_and_map(llama_kv_cache * kv, llama_seq_id seq_id, std::vector<int32_t> & cell_of_pos, llama_pos & pos_max) {
    auto & cells = pyasl_access::cells(kv);
    if (pyasl_access::layers(kv).empty()) {
        PYASL_FAIL(PYASL_ERR_UNSUPPORTED, "the model has no global-attention layers (every layer uses the sliding window): "
                   "there is no full-context KV cache to prune");
    }
    if (seq_id < 0 || seq_id >= LLAMA_MAX_SEQ || (uint32_t) seq_id >= pyasl_access::n_seq_max(kv)) {
        PYASL_FAIL(PYASL_ERR_ARG, "seq_id " + std::to_string(seq_id) + " out of range (the context has n_seq_max " +
                   std::to_string(pyasl_access::n_seq_max(kv)) + ")");
    }
    if (cells.get_has_shift()) {
        PYASL_FAIL(PYASL_ERR_STATE, "the KV cache has a pending position shift; run a decode (or llama_memory_update) first");
    }
    pos_max = cells.seq_pos_max(seq_id);
    if (pos_max < 0) {
        PYASL_FAIL(PYASL_ERR_STATE, "sequence " + std::to_string(seq_id) + " has no cells in the KV cache");
    }
    cell_of_pos.assign((size_t) pos_max + 1, -1);
    const uint32_t n = cells.used_max_p1();
    for (uint32_t i = 0; i < n; ++i) {
        if (cells.is_empty(i)) {
            continue;
        }
        if (cells.seq_count(i) != 1 || !cells.seq_has(i, seq_id)) {
            PYASL_FAIL(PYASL_ERR_STATE, "cell " + std::to_string(i) +
                       " is shared between sequences or belongs to another sequence; pruning needs a cache that holds one sequence");
        }
        const llama_pos p = cells.pos_get(i);
        if (p < 0 || p > pos_max) {
            PYASL_FAIL(PYASL_ERR_STATE, "cell position out of range");
        }
        if (cell_of_pos[p] != -1) {
            PYASL_FAIL(PYASL_ERR_STATE, "position " + std::to_string(p) + " appears in two cells");
        }
        cell_of_pos[p] = (int32_t) i;
    }
    return PYASL_OK;
}

int32_t check_positions(const int32_t * pos, int32_t n, const std::vector<int32_t> & cell_of_pos, const char * what) {
    for (int32_t i = 0; i < n; ++i) {
        const int32_t p = pos[i];
        if (p < 0 || (size_t) p >= cell_of_pos.size() || cell_of_pos[p] < 0) {
            PYASL_FAIL(PYASL_ERR_ARG, std::string(what) + ": position " + std::to_string(p) + " is not in the KV cache");
        }
        if (i > 0 && p <= pos[i - 1]) {
            PYASL_FAIL(PYASL_ERR_ARG, std::string(what) + ": positions must be strictly increasing (" +
                       std::to_string(pos[i - 1]) + " then " + std::to_string(p) + ")");
        }
    }
    return PYASL_OK;
}

// pos[0..n) must be >= 0 and strictly increasing (noun: what the message calls them)
int32_t check_increasing(const int32_t * pos, int32_t n, const char * what, const char * noun) {
    for (int32_t i = 0; i < n; ++i) {
        if (pos[i] < 0 || (i > 0 && pos[i] <= pos[i - 1])) {
            PYASL_FAIL(PYASL_ERR_ARG, std::string(what) + ": " + noun + " must be >= 0 and strictly increasing");
        }
    }
    return PYASL_OK;
}

// Can gather_rows handle tensor t with n_lists (1 = all heads) source lists? Checked for every layer
// before any tensor is written, so that a refusal leaves the cache untouched.
int32_t check_layout(const ggml_tensor * t, bool transposed, int64_t n_head, uint32_t kv_size, size_t n_lists) {
    if (n_lists != 1 && (int64_t) n_lists != n_head) {
        PYASL_FAIL(PYASL_ERR_ARG, "internal: head count mismatch");
    }
    if (n_head <= 0 || t->ne[1] != (int64_t) kv_size || t->ne[2] != 1 || t->ne[3] != 1) {
        PYASL_FAIL(PYASL_ERR_UNSUPPORTED, std::string("unexpected KV tensor layout ") + t->name);
    }
    if (!transposed) {
        if (n_lists == 1) {
            return PYASL_OK;
        }
        if (t->ne[0] % n_head != 0) {
            PYASL_FAIL(PYASL_ERR_UNSUPPORTED, "row does not split evenly into heads");
        }
        if ((t->ne[0] / n_head) % ggml_blck_size(t->type) != 0) {
            PYASL_FAIL(PYASL_ERR_UNSUPPORTED, std::string("per-head selection needs head size a multiple of the block size of ") +
                       ggml_type_name(t->type));
        }
        return PYASL_OK;
    }
    if (ggml_blck_size(t->type) != 1) {
        PYASL_FAIL(PYASL_ERR_UNSUPPORTED, "transposed V with a block-quantized type");
    }
    if (n_lists != 1 && t->ne[0] % n_head != 0) {
        PYASL_FAIL(PYASL_ERR_UNSUPPORTED, "V channels do not split evenly into heads");
    }
    return PYASL_OK;
}

// Gather rows from tensor ts (size_s cells) into cells 0..k-1 of tensor td (size_d cells; td may be
// ts): for each head h, destination cell i gets source cell src[h][i] (1 list = all heads).
// K (and non-transposed V) rows: [n_embd_gqa per cell], heads contiguous inside a row.
// Transposed V: channel-major, element (c, cell) at c*kv_size + cell.
int32_t gather_rows(ggml_tensor * ts, uint32_t size_s, ggml_tensor * td, uint32_t size_d, bool transposed,
                    int64_t n_head, const std::vector<std::vector<int32_t>> & src, std::vector<uint8_t> & buf) {
    const int64_t k = (int64_t) src[0].size();
    int32_t rc = check_layout(ts, transposed, n_head, size_s, src.size());
    if (rc == PYASL_OK && td != ts) {
        rc = check_layout(td, transposed, n_head, size_d, src.size());
    }
    if (rc != PYASL_OK) {
        return rc;
    }
    if (k > (int64_t) size_d || td->type != ts->type || td->ne[0] != ts->ne[0]) {
        PYASL_FAIL(PYASL_ERR_ARG, "internal: gather_rows shapes differ");
    }
    const size_t nbytes = ggml_nbytes(ts);
    buf.resize(nbytes);
    ggml_backend_tensor_get(ts, buf.data(), 0, nbytes);

    if (!transposed) {
        const size_t row = ts->nb[1];
        std::vector<uint8_t> out((size_t) k*row);
        if (src.size() == 1) {
            for (int64_t i = 0; i < k; ++i) {
                std::memcpy(out.data() + i*row, buf.data() + (size_t) src[0][i]*row, row);
            }
        } else {
            const int64_t d = ts->ne[0] / n_head;
            const size_t hb = ggml_row_size(ts->type, d);
            for (int64_t h = 0; h < n_head; ++h) {
                for (int64_t i = 0; i < k; ++i) {
                    std::memcpy(out.data() + i*row + h*hb, buf.data() + (size_t) src[h][i]*row + h*hb, hb);
                }
            }
        }
        ggml_backend_tensor_set(td, out.data(), 0, out.size());
        return PYASL_OK;
    }

    const size_t es = ggml_type_size(ts->type);
    const int64_t n_chan = ts->ne[0];
    const int64_t d = n_chan / n_head;
    std::vector<uint8_t> out((size_t) k*es);
    for (int64_t c = 0; c < n_chan; ++c) {
        const auto & s = src.size() == 1 ? src[0] : src[c / d];
        const uint8_t * in = buf.data() + (size_t) c*size_s*es;
        for (int64_t i = 0; i < k; ++i) {
            std::memcpy(out.data() + i*es, in + (size_t) s[i]*es, es);
        }
        ggml_backend_tensor_set(td, out.data(), (size_t) c*size_d*es, out.size());
    }
    return PYASL_OK;
}

// cells 0..n-1 get the positions meta_pos (ext copied from the cell that held the position, when
// there is one), every other cell is freed; the per-layer counts are dropped
void set_meta(llama_kv_cache * kv, llama_seq_id seq_id, const std::vector<int32_t> & cell_of_pos,
              const std::vector<int32_t> & meta_pos) {
    auto & cells = pyasl_access::cells(kv);
    std::vector<llama_kv_cell_ext> ext(meta_pos.size());
    for (size_t i = 0; i < meta_pos.size(); ++i) {
        const int32_t p = meta_pos[i];
        if (p >= 0 && (size_t) p < cell_of_pos.size() && cell_of_pos[p] >= 0) {
            ext[i] = cells.ext_get((uint32_t) cell_of_pos[p]);
        }
    }
    cells.reset();
    for (size_t i = 0; i < meta_pos.size(); ++i) {
        cells.pos_set((uint32_t) i, meta_pos[i]);
        cells.ext_set((uint32_t) i, ext[i]);
        cells.seq_add((uint32_t) i, seq_id);
    }
    pyasl_access::head(kv) = 0;
    kv->pyasl_layer_mask_reset();
}

// core: per cache layer, per head (1 list = all heads) source cells; new metadata positions
int32_t rewrite(llama_kv_cache * kv, llama_seq_id seq_id, const std::vector<int32_t> & cell_of_pos,
                const std::vector<std::vector<std::vector<int32_t>>> & src_by_layer, // [n_cache_layer][1 or n_head_kv][k]
                const std::vector<int32_t> & meta_pos) {
    auto & cells = pyasl_access::cells(kv);
    auto & layers = pyasl_access::layers(kv);
    const auto & hp = pyasl_access::hparams(kv);
    const uint32_t kv_size = cells.size();
    const bool vt = pyasl_access::v_trans(kv);
    std::vector<uint8_t> buf;

    if (src_by_layer.size() != layers.size()) {
        PYASL_FAIL(PYASL_ERR_ARG, "internal: layer count mismatch");
    }
    // validate every layer before the first write: a refusal must leave the cache as it was
    for (size_t ikv = 0; ikv < layers.size(); ++ikv) {
        const auto & l = layers[ikv];
        const int64_t n_head_kv = hp.n_head_kv(l.il);
        int32_t rc = check_layout(l.k, false, n_head_kv, kv_size, src_by_layer[ikv].size());
        if (rc == PYASL_OK && l.v) {
            rc = check_layout(l.v, vt, n_head_kv, kv_size, src_by_layer[ikv].size());
        }
        if (rc != PYASL_OK) {
            return rc;
        }
    }

    for (size_t ikv = 0; ikv < layers.size(); ++ikv) {
        const auto & l = layers[ikv];
        const auto & src = src_by_layer[ikv];
        const int64_t n_head_kv = hp.n_head_kv(l.il);
        int32_t rc = gather_rows(l.k, kv_size, l.k, kv_size, false, n_head_kv, src, buf);
        if (rc != PYASL_OK) {
            return rc;
        }
        if (l.v) {
            rc = gather_rows(l.v, kv_size, l.v, kv_size, vt, n_head_kv, src, buf);
            if (rc != PYASL_OK) {
                return rc;
            }
        }
    }

    // metadata: cells 0..k-1 hold the kept positions, the rest are free
    set_meta(kv, seq_id, cell_of_pos, meta_pos);
    return PYASL_OK;
}

// copy the K/V rows of cells [0, n_cells) of model layers [il_begin, il_end) stored in cache ks to kd
int32_t copy_cache_cells(llama_kv_cache * kd, llama_kv_cache * ks, int32_t il_begin, int32_t il_end, int32_t n_cells) {
    const uint32_t size_d = pyasl_access::cells(kd).size();
    const uint32_t size_s = pyasl_access::cells(ks).size();
    if (n_cells < 0 || (uint32_t) n_cells > size_d || (uint32_t) n_cells > size_s || il_begin < 0 || il_begin > il_end) {
        PYASL_FAIL(PYASL_ERR_ARG, "pyasl_kv_copy_cells: bad cell count or layer range");
    }
    if (pyasl_access::v_trans(kd) != pyasl_access::v_trans(ks)) {
        PYASL_FAIL(PYASL_ERR_UNSUPPORTED, "pyasl_kv_copy_cells: the caches store V differently (flash attention setting)");
    }
    const bool vt = pyasl_access::v_trans(kd);
    std::vector<uint8_t> buf;
    for (int pass = 0; pass < 2; ++pass) { // pass 0 checks every layer, pass 1 copies
        for (int32_t il = il_begin; il < il_end; ++il) {
            const int32_t id = pyasl_access::ikv(kd, il), is = pyasl_access::ikv(ks, il);
            if ((id < 0) != (is < 0)) {
                PYASL_FAIL(PYASL_ERR_UNSUPPORTED, "pyasl_kv_copy_cells: layer " + std::to_string(il) + " is cached in one context only");
            }
            if (id < 0) {
                continue;
            }
            const auto & ld = pyasl_access::layers(kd)[id];
            const auto & ls = pyasl_access::layers(ks)[is];
            for (int kv = 0; kv < 2; ++kv) {
                ggml_tensor * td = kv ? ld.v : ld.k;
                ggml_tensor * ts = kv ? ls.v : ls.k;
                if (!td != !ts) {
                    PYASL_FAIL(PYASL_ERR_UNSUPPORTED, "pyasl_kv_copy_cells: the caches differ in layout");
                }
                if (!td) {
                    continue;
                }
                if (td->type != ts->type || td->ne[0] != ts->ne[0] || td->ne[1] != (int64_t) size_d ||
                        ts->ne[1] != (int64_t) size_s || td->ne[2] != 1 || ts->ne[2] != 1) {
                    PYASL_FAIL(PYASL_ERR_UNSUPPORTED, "pyasl_kv_copy_cells: cache types differ");
                }
                if (pass == 0) {
                    continue;
                }
                if (kv == 0 || !vt) {
                    const size_t row = ts->nb[1];
                    buf.resize(row*n_cells);
                    ggml_backend_tensor_get(ts, buf.data(), 0, buf.size());
                    ggml_backend_tensor_set(td, buf.data(), 0, buf.size());
                } else {
                    const size_t es = ggml_type_size(ts->type);
                    buf.resize(es*n_cells);
                    for (int64_t c = 0; c < ts->ne[0]; ++c) {
                        ggml_backend_tensor_get(ts, buf.data(), (size_t) c*size_s*es, buf.size());
                        ggml_backend_tensor_set(td, buf.data(), (size_t) c*size_d*es, buf.size());
                    }
                }
            }
        }
    }
    return PYASL_OK;
}

} // namespace

bool pyasl_kv_one_layer_requested(void) {
    return g_kv_one_layer;
}

extern "C" {

int32_t pyasl_set_score_window(struct llama_context * ctx, int32_t n_window, int32_t mode) {
    if (!ctx) {
        PYASL_FAIL(PYASL_ERR_ARG, "null llama_context");
    }
    if (n_window < 0 || mode < 0 || mode > 2) {
        PYASL_FAIL(PYASL_ERR_ARG, "pyasl_set_score_window: n_window must be >= 0 and mode 0, 1 or 2");
    }
    auto & cp = pyasl_access::cparams(ctx);
    if (n_window > 0 && (uint32_t) n_window > cp.n_ubatch) {
        PYASL_FAIL(PYASL_ERR_ARG, "observation window " + std::to_string(n_window) + " is longer than n_ubatch " +
                   std::to_string(cp.n_ubatch));
    }
    cp.pyasl_score_window = n_window;
    cp.pyasl_score_mode   = mode;
    return PYASL_OK;
}

int32_t pyasl_set_layer_range(struct llama_context * ctx, int32_t begin, int32_t end) {
    if (!ctx) {
        PYASL_FAIL(PYASL_ERR_ARG, "null llama_context");
    }
    const llama_model & model = ctx->get_model();
    const int32_t n_layer = (int32_t) model.hparams.n_layer();
    if (begin < 0 || end > n_layer || begin >= end) {
        PYASL_FAIL(PYASL_ERR_ARG, "layer range [" + std::to_string(begin) + ", " + std::to_string(end) +
                   ") is not inside [0, " + std::to_string(n_layer) + ")");
    }
    const bool whole = begin == 0 && end == n_layer;
    if (!whole) {
        switch (model.arch) {
            case LLM_ARCH_LLAMA: case LLM_ARCH_QWEN2: case LLM_ARCH_QWEN3: case LLM_ARCH_GEMMA3:
            case LLM_ARCH_PHI3: case LLM_ARCH_MISTRAL3:
                break;
            default:
                PYASL_FAIL(PYASL_ERR_UNSUPPORTED, std::string("layer ranges are not implemented for architecture ") +
                           llm_arch_name(model.arch));
        }
    }
    auto & cp = pyasl_access::cparams(ctx);
    cp.pyasl_layer_begin = whole ? 0 : begin;
    cp.pyasl_layer_end   = whole ? 0 : end;
    return PYASL_OK;
}

int32_t pyasl_set_hidden_output(struct llama_context * ctx, int32_t lid, bool enable) {
    if (!ctx) {
        PYASL_FAIL(PYASL_ERR_ARG, "null llama_context");
    }
    const int32_t n_layer = (int32_t) ctx->get_model().hparams.n_layer();
    if (lid < 0 || lid > n_layer) {
        PYASL_FAIL(PYASL_ERR_ARG, "hidden output layer " + std::to_string(lid) + " outside 0.." + std::to_string(n_layer));
    }
    // Not llama_context::set_embeddings_layer_inp: that rebuilds the scheduler and reallocates every
    // compute buffer (sched_reserve), which a layer-major pass paid once per layer. The flag alone is
    // enough here: output_reserve sizes the host copy at each decode, the scheduler reallocates a graph
    // that outgrows its buffer, and patches/0003 keeps a graph built with other flags from being reused.
    pyasl_access::cparams(ctx).embeddings_layer_inp[lid] = enable;
    return PYASL_OK;
}

float * pyasl_get_hidden(struct llama_context * ctx, int32_t lid) {
    if (!ctx || lid < 0 || lid > (int32_t) ctx->get_model().hparams.n_layer() ||
            !pyasl_access::cparams(ctx).embeddings_layer_inp[lid]) {
        pyasl_set_error("pyasl_get_hidden: layer input not armed");
        return nullptr;
    }
    if (!pyasl_access::has_layer_inp(ctx, lid)) {
        pyasl_set_error("pyasl_get_hidden: no hidden states yet (armed, but no decode has run since)");
        return nullptr;
    }
    return ctx->get_embeddings_layer_inp((uint32_t) lid);
}

int32_t pyasl_set_reuse_cells(struct llama_context * ctx, bool reuse) {
    caches c;
    int32_t rc = get_caches(ctx, c);
    if (rc != PYASL_OK) {
        return rc;
    }
    pyasl_access::cparams(ctx).pyasl_reuse_cells = reuse;
    c.base->pyasl_reuse_cells = reuse;
    if (c.swa) {
        // the sliding-window cache does not reuse: it keeps only the last positions, which a recompute
        // pass from the first position cannot find. A pass starts on an empty SWA cache and fills it
        // like an ordinary prefill (same ubatches -> same cells), so its attention spans ~n_swa + n_ubatch
        // cells and the K/V it ends with sit where every earlier pass put theirs.
        c.swa->pyasl_reuse_cells = false;
        if (reuse) {
            c.swa->clear(false);
        }
    }
    return PYASL_OK;
}

int32_t pyasl_set_allow_pos_gaps(struct llama_context * ctx, bool allow) {
    if (!ctx) {
        PYASL_FAIL(PYASL_ERR_ARG, "null llama_context");
    }
    pyasl_access::cparams(ctx).pyasl_allow_pos_gaps = allow;
    return PYASL_OK;
}

int32_t pyasl_kv_get_info(struct llama_context * ctx, pyasl_kv_info * out) {
    caches c;
    int32_t rc = get_caches(ctx, c);
    if (rc != PYASL_OK) {
        return rc;
    }
    if (!out) {
        PYASL_FAIL(PYASL_ERR_ARG, "null output");
    }
    std::memset(out, 0, sizeof(*out));
    out->n_caches = c.swa ? 2 : 1;
    out->n_stream = (int32_t) pyasl_access::n_stream(c.base);
    out->v_trans = pyasl_access::v_trans(c.base) ? 1 : 0;
    out->size_base = (int32_t) pyasl_access::cells(c.base).size();
    out->used_base = (int32_t) pyasl_access::cells(c.base).get_used();
    out->n_layer_base = (int32_t) pyasl_access::layers(c.base).size();
    out->cell_bytes_base = cell_bytes(c.base);
    if (c.swa) {
        out->size_swa = (int32_t) pyasl_access::cells(c.swa).size();
        out->used_swa = (int32_t) pyasl_access::cells(c.swa).get_used();
        out->n_layer_swa = (int32_t) pyasl_access::layers(c.swa).size();
        out->cell_bytes_swa = cell_bytes(c.swa);
    }
    return PYASL_OK;
}

int32_t pyasl_kv_layer_cell_pos(struct llama_context * ctx, int32_t il, llama_seq_id seq_id, int32_t * pos_out, int32_t n_max) {
    caches c;
    int32_t rc = get_caches(ctx, c);
    if (rc != PYASL_OK) {
        return rc;
    }
    if (!pos_out || n_max < 0 || seq_id < 0 || seq_id >= LLAMA_MAX_SEQ || (uint32_t) seq_id >= pyasl_access::n_seq_max(c.base)) {
        PYASL_FAIL(PYASL_ERR_ARG, "pyasl_kv_layer_cell_pos: bad arguments");
    }
    llama_kv_cache * kv = nullptr;
    if (pyasl_access::ikv(c.base, il) >= 0) {
        kv = c.base;
    } else if (c.swa && pyasl_access::ikv(c.swa, il) >= 0) {
        kv = c.swa;
    } else {
        PYASL_FAIL(PYASL_ERR_ARG, "layer " + std::to_string(il) + " has no KV cache");
    }
    auto & cells = pyasl_access::cells(kv);
    const int32_t n = std::min<int32_t>(n_max, (int32_t) cells.size());
    for (int32_t i = 0; i < n; ++i) {
        pos_out[i] = (!cells.is_empty(i) && cells.seq_has(i, seq_id)) ? cells.pos_get(i) : -1;
    }
    return n;
}

int32_t pyasl_kv_keep(struct llama_context * ctx, llama_seq_id seq_id, const int32_t * pos, int32_t n) {
    caches c;
    int32_t rc = get_caches(ctx, c);
    if (rc != PYASL_OK) {
        return rc;
    }
    if (!pos || n <= 0) {
        PYASL_FAIL(PYASL_ERR_ARG, "pyasl_kv_keep: need at least one position");
    }
    std::vector<int32_t> cell_of_pos;
    llama_pos pos_max;
    if ((rc = check_and_map(c.base, seq_id, cell_of_pos, pos_max)) != PYASL_OK) {
        return rc;
    }
    if ((rc = check_positions(pos, n, cell_of_pos, "pyasl_kv_keep")) != PYASL_OK) {
        return rc;
    }
    if (pos[n - 1] != pos_max) {
        PYASL_FAIL(PYASL_ERR_ARG, "pyasl_kv_keep: the last position " + std::to_string(pos_max) +
                   " must be kept (decoding continues right after it)");
    }
    std::vector<int32_t> src(n);
    for (int32_t i = 0; i < n; ++i) {
        src[i] = cell_of_pos[pos[i]];
    }
    const size_t n_cl = pyasl_access::layers(c.base).size();
    std::vector<std::vector<std::vector<int32_t>>> by_layer(n_cl, std::vector<std::vector<int32_t>>{src});
    return rewrite(c.base, seq_id, cell_of_pos, by_layer, std::vector<int32_t>(pos, pos + n));
}

int32_t pyasl_kv_keep_per_head(struct llama_context * ctx, llama_seq_id seq_id, const int32_t * pos,
                               int32_t n_layer, int32_t n_head_kv, int32_t k) {
    caches c;
    int32_t rc = get_caches(ctx, c);
    if (rc != PYASL_OK) {
        return rc;
    }
    if (!pos || n_layer <= 0 || n_head_kv <= 0 || k <= 0) {
        PYASL_FAIL(PYASL_ERR_ARG, "pyasl_kv_keep_per_head: bad sizes");
    }
    const auto & hp = pyasl_access::hparams(c.base);
    if (hp.use_mrope()) {
        PYASL_FAIL(PYASL_ERR_UNSUPPORTED, "pyasl_kv_keep_per_head: multi-axis RoPE needs one token set for all heads "
                   "(use pyasl_kv_keep)");
    }
    if (hp.use_alibi) {
        PYASL_FAIL(PYASL_ERR_UNSUPPORTED, "pyasl_kv_keep_per_head: ALiBi biases by cell position; per-head sets would "
                   "use wrong positions (use pyasl_kv_keep)");
    }
    std::vector<int32_t> cell_of_pos;
    llama_pos pos_max;
    if ((rc = check_and_map(c.base, seq_id, cell_of_pos, pos_max)) != PYASL_OK) {
        return rc;
    }
    const auto & layers = pyasl_access::layers(c.base);
    std::vector<std::vector<std::vector<int32_t>>> by_layer(layers.size());
    std::vector<int32_t> meta(k, -1);
    for (size_t ikv = 0; ikv < layers.size(); ++ikv) {
        const int32_t il = (int32_t) layers[ikv].il;
        if (il >= n_layer) {
            PYASL_FAIL(PYASL_ERR_ARG, "pyasl_kv_keep_per_head: n_layer " + std::to_string(n_layer) +
                       " does not cover cache layer " + std::to_string(il));
        }
        if ((int32_t) hp.n_head_kv(il) != n_head_kv) {
            PYASL_FAIL(PYASL_ERR_UNSUPPORTED, "pyasl_kv_keep_per_head: layer " + std::to_string(il) + " has " +
                       std::to_string(hp.n_head_kv(il)) + " KV heads, not " + std::to_string(n_head_kv));
        }
        auto & heads = by_layer[ikv];
        heads.resize(n_head_kv);
        for (int32_t h = 0; h < n_head_kv; ++h) {
            const int32_t * p = pos + ((size_t) il*n_head_kv + h)*k;
            if ((rc = check_positions(p, k, cell_of_pos, "pyasl_kv_keep_per_head")) != PYASL_OK) {
                return rc;
            }
            heads[h].resize(k);
            for (int32_t i = 0; i < k; ++i) {
                heads[h][i] = cell_of_pos[p[i]];
                meta[i] = std::max(meta[i], p[i]);
            }
        }
    }
    if (meta[k - 1] != pos_max) {
        PYASL_FAIL(PYASL_ERR_ARG, "pyasl_kv_keep_per_head: the last position " + std::to_string(pos_max) +
                   " must be kept by at least one list (decoding continues right after it)");
    }
    return rewrite(c.base, seq_id, cell_of_pos, by_layer, meta);
}

} // extern "C"

namespace {

// per-layer counts are for plain caches holding K and V with one position axis
int32_t check_layer_mask_cache(const caches & c, const char * what) {
    if (c.swa) {
        PYASL_FAIL(PYASL_ERR_UNSUPPORTED, std::string(what) + ": per-layer budgets are not supported on sliding-window "
                   "models (their caches use separate masks)");
    }
    const auto & hp = pyasl_access::hparams(c.base);
    if (hp.n_pos_per_embd() > 1) {
        PYASL_FAIL(PYASL_ERR_UNSUPPORTED, std::string(what) + ": per-layer budgets need single-axis positions (no M-RoPE)");
    }
    for (const auto & l : pyasl_access::layers(c.base)) {
        if (!l.v) {
            PYASL_FAIL(PYASL_ERR_UNSUPPORTED, std::string(what) + ": per-layer budgets need a cache with V rows (K-only caches "
                       "use another attention path)");
        }
    }
    return PYASL_OK;
}

// counts[il] for every base-cache layer: 1 <= count <= max_count; returns P = max of them
int32_t check_counts(llama_kv_cache * kv, const int32_t * counts, int32_t n_layer, int32_t max_count, const char * what,
                     int32_t & P) {
    P = 0;
    for (const auto & l : pyasl_access::layers(kv)) {
        const int32_t il = (int32_t) l.il;
        if (il >= n_layer) {
            PYASL_FAIL(PYASL_ERR_ARG, std::string(what) + ": n_layer " + std::to_string(n_layer) +
                       " does not cover cache layer " + std::to_string(il));
        }
        const int32_t c = counts[il];
        if (c < 1 || c > max_count) {
            PYASL_FAIL(PYASL_ERR_ARG, std::string(what) + ": layer " + std::to_string(il) + " count " + std::to_string(c) +
                       " is outside 1.." + std::to_string(max_count));
        }
        P = std::max(P, c);
    }
    return PYASL_OK;
}

void install_counts(llama_kv_cache * kv, const int32_t * counts, int32_t P) {
    const uint32_t n_all = pyasl_access::hparams(kv).n_layer_all;
    std::vector<int32_t> v(n_all, -1);
    for (const auto & l : pyasl_access::layers(kv)) {
        v[l.il] = counts[l.il];
    }
    kv->pyasl_layer_cells = std::move(v);
    kv->pyasl_prompt_cells = (uint32_t) P;
}

} // namespace

extern "C" {

int32_t pyasl_kv_keep_per_layer(struct llama_context * ctx, llama_seq_id seq_id, const int32_t * pos,
                                const int32_t * counts, int32_t n_layer, int32_t n_head_kv) {
    static const char * what = "pyasl_kv_keep_per_layer";
    caches c;
    int32_t rc = get_caches(ctx, c);
    if (rc != PYASL_OK) {
        return rc;
    }
    if (!pos || !counts || n_layer <= 0 || n_head_kv <= 0) {
        PYASL_FAIL(PYASL_ERR_ARG, "pyasl_kv_keep_per_layer: bad sizes");
    }
    if ((rc = check_layer_mask_cache(c, what)) != PYASL_OK) {
        return rc;
    }
    std::vector<int32_t> cell_of_pos;
    llama_pos pos_max;
    if ((rc = check_and_map(c.base, seq_id, cell_of_pos, pos_max)) != PYASL_OK) {
        return rc;
    }
    for (int32_t il = 0; il < n_layer; ++il) {
        if (counts[il] < 0) {
            PYASL_FAIL(PYASL_ERR_ARG, std::string(what) + ": negative count for layer " + std::to_string(il));
        }
    }
    int32_t P = 0;
    if ((rc = check_counts(c.base, counts, n_layer, (int32_t) pos_max + 1, what, P)) != PYASL_OK) {
        return rc;
    }
    std::vector<size_t> off(n_layer + 1, 0);
    for (int32_t il = 0; il < n_layer; ++il) {
        off[il + 1] = off[il] + (size_t) n_head_kv*counts[il];
    }
    const auto & layers = pyasl_access::layers(c.base);
    const auto & hp = pyasl_access::hparams(c.base);
    std::vector<std::vector<std::vector<int32_t>>> by_layer(layers.size());
    std::vector<int32_t> meta(P, -1);
    for (size_t ikv = 0; ikv < layers.size(); ++ikv) {
        const int32_t il = (int32_t) layers[ikv].il;
        if ((int32_t) hp.n_head_kv(il) != n_head_kv) {
            PYASL_FAIL(PYASL_ERR_UNSUPPORTED, std::string(what) + ": layer " + std::to_string(il) + " has " +
                       std::to_string(hp.n_head_kv(il)) + " KV heads, not " + std::to_string(n_head_kv));
        }
        const int32_t k = counts[il];
        auto & heads = by_layer[ikv];
        heads.resize(n_head_kv);
        for (int32_t h = 0; h < n_head_kv; ++h) {
            const int32_t * p = pos + off[il] + (size_t) h*k;
            if ((rc = check_positions(p, k, cell_of_pos, what)) != PYASL_OK) {
                return rc;
            }
            heads[h].resize(k);
            for (int32_t i = 0; i < k; ++i) {
                heads[h][i] = cell_of_pos[p[i]];
                meta[i] = std::max(meta[i], p[i]);
            }
        }
    }
    if (meta[P - 1] != pos_max) {
        PYASL_FAIL(PYASL_ERR_ARG, std::string(what) + ": the last position " + std::to_string(pos_max) +
                   " must end a list of the longest layer (decoding continues right after it)");
    }
    // shorter lists end earlier: keep the metadata strictly increasing (equal counts: unchanged)
    for (int32_t i = P - 2; i >= 0; --i) {
        meta[i] = std::min(meta[i], meta[i + 1] - 1);
    }
    if ((rc = rewrite(c.base, seq_id, cell_of_pos, by_layer, meta)) != PYASL_OK) {
        return rc;
    }
    install_counts(c.base, counts, P);
    return PYASL_OK;
}

int32_t pyasl_kv_set_layer_cells(struct llama_context * ctx, llama_seq_id seq_id, const int32_t * counts,
                                 int32_t n_layer, const int32_t * meta_pos, int32_t n_meta) {
    static const char * what = "pyasl_kv_set_layer_cells";
    caches c;
    int32_t rc = get_caches(ctx, c);
    if (rc != PYASL_OK) {
        return rc;
    }
    if (!counts) {
        if (meta_pos) {
            PYASL_FAIL(PYASL_ERR_ARG, std::string(what) + ": metadata positions need counts");
        }
        c.base->pyasl_layer_mask_reset();
        return PYASL_OK;
    }
    if ((rc = check_layer_mask_cache(c, what)) != PYASL_OK) {
        return rc;
    }
    if (n_layer <= 0 || seq_id < 0 || seq_id >= LLAMA_MAX_SEQ) {
        PYASL_FAIL(PYASL_ERR_ARG, std::string(what) + ": bad arguments");
    }
    auto & cells = pyasl_access::cells(c.base);
    if (cells.get_has_shift()) {
        PYASL_FAIL(PYASL_ERR_STATE, std::string(what) + ": the KV cache has a pending position shift");
    }
    int32_t P = 0;
    if ((rc = check_counts(c.base, counts, n_layer, (int32_t) cells.size(), what, P)) != PYASL_OK) {
        return rc;
    }
    if (meta_pos) {
        std::vector<int32_t> cell_of_pos;
        llama_pos pos_max;
        if ((rc = check_and_map(c.base, seq_id, cell_of_pos, pos_max)) != PYASL_OK) {
            return rc;
        }
        if (n_meta != P) {
            PYASL_FAIL(PYASL_ERR_ARG, std::string(what) + ": " + std::to_string(n_meta) + " metadata positions for " +
                       std::to_string(P) + " cells");
        }
        if (cells.used_max_p1() > (uint32_t) P) {
            PYASL_FAIL(PYASL_ERR_STATE, std::string(what) + ": cells past " + std::to_string(P) + " are in use");
        }
        if ((rc = check_increasing(meta_pos, n_meta, what, "metadata positions")) != PYASL_OK) {
            return rc;
        }
        if (meta_pos[n_meta - 1] != pos_max) {
            PYASL_FAIL(PYASL_ERR_ARG, std::string(what) + ": the last metadata position must be the sequence's last "
                       "position " + std::to_string(pos_max));
        }
        set_meta(c.base, seq_id, cell_of_pos, std::vector<int32_t>(meta_pos, meta_pos + n_meta));
    } else {
        for (int32_t i = 0; i < P; ++i) {
            if (cells.is_empty(i) || !cells.seq_has(i, seq_id)) {
                PYASL_FAIL(PYASL_ERR_STATE, std::string(what) + ": cell " + std::to_string(i) + " of the " +
                           std::to_string(P) + " budget cells is not in use by sequence " + std::to_string(seq_id));
            }
        }
    }
    install_counts(c.base, counts, P);
    return PYASL_OK;
}

int32_t pyasl_kv_get_layer_cells(struct llama_context * ctx, int32_t * counts_out, int32_t n_layer) {
    caches c;
    int32_t rc = get_caches(ctx, c);
    if (rc != PYASL_OK) {
        return rc;
    }
    if (n_layer < 0 || (n_layer > 0 && !counts_out)) {
        PYASL_FAIL(PYASL_ERR_ARG, "pyasl_kv_get_layer_cells: bad arguments");
    }
    const auto & v = c.base->pyasl_layer_cells;
    for (int32_t il = 0; il < n_layer; ++il) {
        counts_out[il] = (size_t) il < v.size() ? v[il] : -1;
    }
    return c.base->pyasl_layer_mask_active() ? (int32_t) c.base->pyasl_prompt_cells : 0;
}

int32_t pyasl_kv_renumber(struct llama_context * ctx, llama_seq_id seq_id) {
    caches c;
    int32_t rc = get_caches(ctx, c);
    if (rc != PYASL_OK) {
        return rc;
    }
    if (c.swa) {
        PYASL_FAIL(PYASL_ERR_UNSUPPORTED, "pyasl_kv_renumber: sliding-window caches cannot be renumbered");
    }
    if (!c.base->get_can_shift()) {
        PYASL_FAIL(PYASL_ERR_UNSUPPORTED, "pyasl_kv_renumber: this model's KV cache cannot shift positions");
    }
    if (c.base->pyasl_layer_mask_active()) {
        PYASL_FAIL(PYASL_ERR_STATE, "pyasl_kv_renumber: per-layer cell counts are set (their prompt cells have fixed positions)");
    }
    std::vector<int32_t> cell_of_pos;
    llama_pos pos_max = -1;
    if ((rc = check_and_map(c.base, seq_id, cell_of_pos, pos_max)) != PYASL_OK) {
        return rc;
    }
    // cell of the j-th smallest position moves to position j; in increasing order a moved cell
    // (now at a position <= j) never falls into a later range [p, p+1) with p > j
    int32_t j = 0;
    for (llama_pos p = 0; p <= pos_max; ++p) {
        if (cell_of_pos[p] < 0) {
            continue;
        }
        if (p != j) {
            c.base->seq_add(seq_id, p, p + 1, j - p);
        }
        ++j;
    }
    // rotate the keys now (K-shift): a state saved before the next decode must hold shifted keys,
    // and the pruning calls refuse a cache with a pending shift
    ctx->memory_update(false);
    if (pyasl_access::cells(c.base).get_has_shift()) {
        PYASL_FAIL(PYASL_ERR_BACKEND, "pyasl_kv_renumber: the position shift could not be applied");
    }
    return j;
}

int32_t pyasl_kv_layer_cell_bytes(struct llama_context * ctx, int64_t * out, int32_t n_layer) {
    caches c;
    int32_t rc = get_caches(ctx, c);
    if (rc != PYASL_OK) {
        return rc;
    }
    if (n_layer < 0 || (n_layer > 0 && !out)) {
        PYASL_FAIL(PYASL_ERR_ARG, "pyasl_kv_layer_cell_bytes: bad arguments");
    }
    for (int32_t il = 0; il < n_layer; ++il) {
        out[il] = 0;
    }
    for (llama_kv_cache * kv : {c.base, c.swa}) {
        if (!kv) {
            continue;
        }
        for (const auto & l : pyasl_access::layers(kv)) {
            if ((int32_t) l.il < n_layer) {
                out[l.il] = (int64_t) l.k->nb[1] + (l.v ? (int64_t) ggml_row_size(l.v->type, l.v->ne[0]) : 0);
            }
        }
    }
    return std::min<int32_t>(n_layer, (int32_t) pyasl_access::hparams(c.base).n_layer_all);
}

int32_t pyasl_kv_copy_cells(struct llama_context * dst, struct llama_context * src,
                            int32_t il_begin, int32_t il_end, int32_t n_cells) {
    caches cd, cs;
    int32_t rc = get_cache_pair(dst, src, cd, cs, "pyasl_kv_copy_cells");
    if (rc != PYASL_OK) {
        return rc;
    }
    if ((cd.swa == nullptr) != (cs.swa == nullptr)) {
        PYASL_FAIL(PYASL_ERR_UNSUPPORTED, "pyasl_kv_copy_cells: one context has a sliding-window cache, the other not");
    }
    return copy_cache_cells(cd.base, cs.base, il_begin, il_end, n_cells);
}

int32_t pyasl_kv_copy_cells_swa(struct llama_context * dst, struct llama_context * src,
                                int32_t il_begin, int32_t il_end, int32_t n_cells) {
    caches cd, cs;
    int32_t rc = get_cache_pair(dst, src, cd, cs, "pyasl_kv_copy_cells_swa");
    if (rc != PYASL_OK) {
        return rc;
    }
    if (!cd.swa || !cs.swa) {
        PYASL_FAIL(PYASL_ERR_UNSUPPORTED, "pyasl_kv_copy_cells_swa: both contexts need a sliding-window cache");
    }
    return copy_cache_cells(cd.swa, cs.swa, il_begin, il_end, n_cells);
}

int32_t pyasl_kv_keep_swa(struct llama_context * ctx, llama_seq_id seq_id, const int32_t * pos, int32_t n) {
    caches c;
    int32_t rc = get_caches(ctx, c);
    if (rc != PYASL_OK) {
        return rc;
    }
    if (!c.swa) {
        PYASL_FAIL(PYASL_ERR_UNSUPPORTED, "pyasl_kv_keep_swa: the context has no sliding-window cache");
    }
    if (!pos || n <= 0) {
        PYASL_FAIL(PYASL_ERR_ARG, "pyasl_kv_keep_swa: need at least one position");
    }
    std::vector<int32_t> cell_of_pos;
    llama_pos pos_max;
    if ((rc = check_and_map(c.swa, seq_id, cell_of_pos, pos_max)) != PYASL_OK) {
        return rc;
    }
    if ((rc = check_positions(pos, n, cell_of_pos, "pyasl_kv_keep_swa")) != PYASL_OK) {
        return rc;
    }
    if (pos[n - 1] != pos_max) {
        PYASL_FAIL(PYASL_ERR_ARG, "pyasl_kv_keep_swa: the last position " + std::to_string(pos_max) +
                   " must be kept (decoding continues right after it)");
    }
    std::vector<int32_t> src(n);
    for (int32_t i = 0; i < n; ++i) {
        src[i] = cell_of_pos[pos[i]];
    }
    const size_t n_cl = pyasl_access::layers(c.swa).size();
    std::vector<std::vector<std::vector<int32_t>>> by_layer(n_cl, std::vector<std::vector<int32_t>>{src});
    return rewrite(c.swa, seq_id, cell_of_pos, by_layer, std::vector<int32_t>(pos, pos + n));
}

void pyasl_set_kv_one_layer(bool on) {
    g_kv_one_layer = on;
}

int32_t pyasl_kv_gather_layer(struct llama_context * dst, struct llama_context * src, llama_seq_id seq_id, int32_t il,
                              const int32_t * pos, int32_t n_head_kv, int32_t k) {
    static const char * what = "pyasl_kv_gather_layer";
    caches cd, cs;
    int32_t rc = get_cache_pair(dst, src, cd, cs, what);
    if (rc != PYASL_OK) {
        return rc;
    }
    if (cd.swa || cs.swa) {
        PYASL_FAIL(PYASL_ERR_UNSUPPORTED, std::string(what) + ": sliding-window caches are not supported");
    }
    const auto & hp = pyasl_access::hparams(cs.base);
    if (!pos || il < 0 || (uint32_t) il >= hp.n_layer() || k <= 0) {
        PYASL_FAIL(PYASL_ERR_ARG, std::string(what) + ": bad layer or sizes");
    }
    if (hp.use_mrope() || hp.use_alibi) {
        PYASL_FAIL(PYASL_ERR_UNSUPPORTED, std::string(what) + ": per-head sets need a model whose keys do not depend "
                   "on the cell position (no multi-axis RoPE, no ALiBi)");
    }
    if ((int32_t) hp.n_head_kv(il) != n_head_kv) {
        PYASL_FAIL(PYASL_ERR_ARG, std::string(what) + ": layer " + std::to_string(il) + " has " +
                   std::to_string(hp.n_head_kv(il)) + " KV heads, not " + std::to_string(n_head_kv));
    }
    const int32_t id = pyasl_access::ikv(cd.base, il), is = pyasl_access::ikv(cs.base, il);
    if (id < 0 || is < 0) {
        PYASL_FAIL(PYASL_ERR_UNSUPPORTED, std::string(what) + ": layer " + std::to_string(il) + " has no KV cache");
    }
    if (pyasl_access::v_trans(cd.base) != pyasl_access::v_trans(cs.base)) {
        PYASL_FAIL(PYASL_ERR_UNSUPPORTED, std::string(what) + ": the caches store V differently (flash attention setting)");
    }
    const uint32_t size_d = pyasl_access::cells(cd.base).size();
    const uint32_t size_s = pyasl_access::cells(cs.base).size();
    if ((uint32_t) k > size_d) {
        PYASL_FAIL(PYASL_ERR_ARG, std::string(what) + ": " + std::to_string(k) + " rows do not fit the " +
                   std::to_string(size_d) + " cells of the destination");
    }
    std::vector<int32_t> cell_of_pos;
    llama_pos pos_max;
    if ((rc = check_and_map(cs.base, seq_id, cell_of_pos, pos_max)) != PYASL_OK) {
        return rc;
    }
    std::vector<std::vector<int32_t>> heads(n_head_kv, std::vector<int32_t>(k));
    for (int32_t h = 0; h < n_head_kv; ++h) {
        const int32_t * p = pos + (size_t) h*k;
        if ((rc = check_positions(p, k, cell_of_pos, what)) != PYASL_OK) {
            return rc;
        }
        for (int32_t i = 0; i < k; ++i) {
            heads[h][i] = cell_of_pos[p[i]];
        }
    }
    const auto & ld = pyasl_access::layers(cd.base)[id];
    const auto & ls = pyasl_access::layers(cs.base)[is];
    const bool vt = pyasl_access::v_trans(cs.base);
    for (int kv = 0; kv < 2; ++kv) { // check both tensors before the first write
        ggml_tensor * td = kv ? ld.v : ld.k;
        ggml_tensor * ts = kv ? ls.v : ls.k;
        if (!td != !ts || (td && (td->type != ts->type || td->ne[0] != ts->ne[0]))) {
            PYASL_FAIL(PYASL_ERR_UNSUPPORTED, std::string(what) + ": the caches differ in layout or types");
        }
        if (td && ((rc = check_layout(ts, kv && vt, n_head_kv, size_s, heads.size())) != PYASL_OK ||
                   (rc = check_layout(td, kv && vt, n_head_kv, size_d, heads.size())) != PYASL_OK)) {
            return rc;
        }
    }
    std::vector<uint8_t> buf;
    for (int kv = 0; kv < 2; ++kv) {
        ggml_tensor * td = kv ? ld.v : ld.k;
        ggml_tensor * ts = kv ? ls.v : ls.k;
        if (td && (rc = gather_rows(ts, size_s, td, size_d, kv && vt, n_head_kv, heads, buf)) != PYASL_OK) {
            return rc;
        }
    }
    return PYASL_OK;
}

int32_t pyasl_kv_set_cell_positions(struct llama_context * ctx, llama_seq_id seq_id, const int32_t * pos, int32_t n) {
    static const char * what = "pyasl_kv_set_cell_positions";
    caches c;
    int32_t rc = get_caches(ctx, c);
    if (rc != PYASL_OK) {
        return rc;
    }
    if (c.swa) {
        PYASL_FAIL(PYASL_ERR_UNSUPPORTED, std::string(what) + ": sliding-window caches are not supported");
    }
    if (pyasl_access::hparams(c.base).use_mrope()) {
        PYASL_FAIL(PYASL_ERR_UNSUPPORTED, std::string(what) + ": multi-axis RoPE cells carry more than a position");
    }
    if (!pos || n <= 0 || (uint32_t) n > pyasl_access::cells(c.base).size() || seq_id < 0 || seq_id >= LLAMA_MAX_SEQ ||
            (uint32_t) seq_id >= pyasl_access::n_seq_max(c.base)) {
        PYASL_FAIL(PYASL_ERR_ARG, std::string(what) + ": bad sizes or sequence id");
    }
    if ((rc = check_increasing(pos, n, what, "positions")) != PYASL_OK) {
        return rc;
    }
    set_meta(c.base, seq_id, {}, std::vector<int32_t>(pos, pos + n));
    return PYASL_OK;
}

} // extern "C"
