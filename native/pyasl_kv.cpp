// KV-cache rewriting: move kept rows to the front of the cache, per layer and per KV head.
// Rows travel through host memory with ggml_backend_tensor_get/set, so every backend takes the
// same path (one read and one write per layer tensor).
#include "pyasl_common.h"

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

// Can move_rows handle tensor t with n_lists (1 = all heads) source lists? Checked for every layer
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

// Rewrite one cache tensor so that, for each head h, destination cell i holds source cell src[h][i].
// K (and non-transposed V) rows: [n_embd_gqa per cell], heads contiguous inside a row.
// Transposed V: channel-major, element (c, cell) at c*kv_size + cell.
int32_t move_rows(ggml_tensor * t, bool transposed, int64_t n_head, uint32_t kv_size,
                  const std::vector<std::vector<int32_t>> & src, std::vector<uint8_t> & buf) {
    const size_t nbytes = ggml_nbytes(t);
    const int64_t k = (int64_t) src[0].size();
    int32_t rc = check_layout(t, transposed, n_head, kv_size, src.size());
    if (rc != PYASL_OK) {
        return rc;
    }
    buf.resize(nbytes);
    ggml_backend_tensor_get(t, buf.data(), 0, nbytes);
    std::vector<uint8_t> out(buf.size());

    if (!transposed) {
        const size_t row = t->nb[1];
        if (src.size() == 1) {
            for (int64_t i = 0; i < k; ++i) {
                std::memcpy(out.data() + i*row, buf.data() + (size_t) src[0][i]*row, row);
            }
        } else {
            const int64_t d = t->ne[0] / n_head;
            const size_t hb = ggml_row_size(t->type, d);
            for (int64_t h = 0; h < n_head; ++h) {
                for (int64_t i = 0; i < k; ++i) {
                    std::memcpy(out.data() + i*row + h*hb, buf.data() + (size_t) src[h][i]*row + h*hb, hb);
                }
            }
        }
        ggml_backend_tensor_set(t, out.data(), 0, (size_t) k*row);
        return PYASL_OK;
    }

    const size_t es = ggml_type_size(t->type);
    const int64_t n_chan = t->ne[0];
    const int64_t d = n_chan / n_head;
    for (int64_t c = 0; c < n_chan; ++c) {
        const auto & s = src.size() == 1 ? src[0] : src[c / d];
        const uint8_t * in = buf.data() + (size_t) c*kv_size*es;
        uint8_t * o = out.data() + (size_t) c*kv_size*es;
        for (int64_t i = 0; i < k; ++i) {
            std::memcpy(o + i*es, in + (size_t) s[i]*es, es);
        }
        ggml_backend_tensor_set(t, o, (size_t) c*kv_size*es, (size_t) k*es);
    }
    return PYASL_OK;
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
        int32_t rc = move_rows(l.k, false, n_head_kv, kv_size, src, buf);
        if (rc != PYASL_OK) {
            return rc;
        }
        if (l.v) {
            rc = move_rows(l.v, vt, n_head_kv, kv_size, src, buf);
            if (rc != PYASL_OK) {
                return rc;
            }
        }
    }

    // metadata: cells 0..k-1 hold the kept positions, the rest are free
    std::vector<llama_kv_cell_ext> ext(meta_pos.size());
    for (size_t i = 0; i < meta_pos.size(); ++i) {
        ext[i] = cells.ext_get((uint32_t) cell_of_pos[meta_pos[i]]);
    }
    cells.reset();
    for (size_t i = 0; i < meta_pos.size(); ++i) {
        cells.pos_set((uint32_t) i, meta_pos[i]);
        cells.ext_set((uint32_t) i, ext[i]);
        cells.seq_add((uint32_t) i, seq_id);
    }
    pyasl_access::head(kv) = 0;
    return PYASL_OK;
}

} // namespace

extern "C" {

int32_t pyasl_set_score_window(struct llama_context * ctx, int32_t n_window, int32_t mode) {
    if (!ctx) {
        PYASL_FAIL(PYASL_ERR_ARG, "null llama_context");
    }
    if (n_window < 0 || mode < 0 || mode > 1) {
        PYASL_FAIL(PYASL_ERR_ARG, "pyasl_set_score_window: n_window must be >= 0 and mode 0 or 1");
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
    ctx->set_embeddings_layer_inp((uint32_t) lid, enable);
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
        c.swa->pyasl_reuse_cells = reuse;
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

int32_t pyasl_kv_copy_cells(struct llama_context * dst, struct llama_context * src,
                            int32_t il_begin, int32_t il_end, int32_t n_cells) {
    caches cd, cs;
    int32_t rc;
    if ((rc = get_caches(dst, cd)) != PYASL_OK || (rc = get_caches(src, cs)) != PYASL_OK) {
        return rc;
    }
    if (cd.swa || cs.swa) {
        PYASL_FAIL(PYASL_ERR_UNSUPPORTED, "pyasl_kv_copy_cells: sliding-window caches are not supported");
    }
    if (&dst->get_model() != &src->get_model()) {
        PYASL_FAIL(PYASL_ERR_ARG, "pyasl_kv_copy_cells: the contexts use different models");
    }
    const uint32_t size_d = pyasl_access::cells(cd.base).size();
    const uint32_t size_s = pyasl_access::cells(cs.base).size();
    if (n_cells < 0 || (uint32_t) n_cells > size_d || (uint32_t) n_cells > size_s || il_begin < 0 || il_begin > il_end) {
        PYASL_FAIL(PYASL_ERR_ARG, "pyasl_kv_copy_cells: bad cell count or layer range");
    }
    if (pyasl_access::v_trans(cd.base) != pyasl_access::v_trans(cs.base)) {
        PYASL_FAIL(PYASL_ERR_UNSUPPORTED, "pyasl_kv_copy_cells: the caches store V differently (flash attention setting)");
    }
    const bool vt = pyasl_access::v_trans(cd.base);
    std::vector<uint8_t> buf;
    for (int pass = 0; pass < 2; ++pass) { // pass 0 checks every layer, pass 1 copies
        for (int32_t il = il_begin; il < il_end; ++il) {
            const int32_t id = pyasl_access::ikv(cd.base, il), is = pyasl_access::ikv(cs.base, il);
            if ((id < 0) != (is < 0)) {
                PYASL_FAIL(PYASL_ERR_UNSUPPORTED, "pyasl_kv_copy_cells: layer " + std::to_string(il) + " is cached in one context only");
            }
            if (id < 0) {
                continue;
            }
            const auto & ld = pyasl_access::layers(cd.base)[id];
            const auto & ls = pyasl_access::layers(cs.base)[is];
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

} // extern "C"
