// Window-attention score graph (see pyasl-hooks.h). Only ggml ops: the same code runs on every backend.
#include "pyasl-hooks.h"

// Rows [first, first + n) of every head of x [n_kv, rows, n_head] (a view)
static ggml_tensor * rows(ggml_context * ctx, ggml_tensor * x, int64_t first, int64_t n) {
    return ggml_set_name(ggml_view_3d(ctx, x, x->ne[0], n, x->ne[2], x->nb[1], x->nb[2], first*x->nb[1]),
                         "pyasl_window_rows");
}

// What the caller reads from the window's probabilities [n_kv, W, n_head] (maybe a view): mode 1 the
// probabilities themselves, mode 0 their sum over the window queries [n_kv, n_head]; contiguous either way
static ggml_tensor * window_scores(ggml_context * ctx, ggml_tensor * probs, int32_t mode) {
    // the intermediate nodes are named here: ggml would name them after the attention's own tensors
    // ("kq_soft_max-<il> (view) ..."), which the capture's name prefixes would then match
    if (mode == 1) {
        return ggml_cont(ctx, probs);  // a node of its own (named by the caller), even when already contiguous
    }
    // Sum over the window queries by halving: each step adds the last half of the rows to the first,
    // reading the rows where they lie. Transposing [n_kv, W, n_head] to sum rows costs a strided copy
    // of the whole window (about as long as the repeated chunk's own attention for a window of 500
    // rows over 4K cells); the halving streams it, and ADD runs on every backend.
    ggml_tensor * t = probs;
    ggml_tensor * odd = nullptr;  // the middle rows of odd-length steps, added at the end
    for (int64_t w = probs->ne[1]; w > 1; w /= 2) {
        const int64_t half = w/2;
        ggml_tensor * lo = rows(ctx, t, 0, half);
        ggml_tensor * hi = rows(ctx, t, w - half, half);
        if (w % 2) {
            ggml_tensor * mid = rows(ctx, t, half, 1);
            odd = odd ? ggml_add(ctx, odd, mid) : ggml_cont(ctx, mid);
            ggml_set_name(odd, "pyasl_window_sum");
        }
        t = ggml_set_name(ggml_add(ctx, lo, hi), "pyasl_window_sum");
    }
    if (odd) {
        t = ggml_set_name(ggml_add(ctx, t, odd), "pyasl_window_sum");
    }
    if (!ggml_is_contiguous(t)) {  // a window of one row: a view of the probabilities
        t = ggml_set_name(ggml_cont(ctx, t), "pyasl_window_sum");
    }
    return ggml_reshape_2d(ctx, t, t->ne[0], t->ne[2]);
}

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
        int32_t mode) {
    const int64_t n_tokens = q->ne[1];
    if (n_window <= 0 || n_tokens < n_window || q->ne[3] != 1 || k->ne[3] != 1) {
        return nullptr;
    }
    const int64_t off = n_tokens - n_window;

    // the last n_window queries
    ggml_tensor * qw = ggml_view_4d(ctx, q, q->ne[0], n_window, q->ne[2], q->ne[3],
                                    q->nb[1], q->nb[2], q->nb[3], off*q->nb[1]);

    ggml_tensor * kq = ggml_mul_mat(ctx, k, qw); // [n_kv, n_window, n_head, 1]
    ggml_prec_set_acc(kq, GGML_PREC_F32);

    if (mode == 2) {
        // GemFilter's score: the raw q.k products (no scale, bias, mask or softmax), summed over the
        // window queries; cells the queries may not see hold products too (the caller reads only
        // the positions it needs)
        return window_scores(ctx, kq, 0);
    }

    if (softcap != 0.0f) {
        kq = ggml_scale(ctx, kq, 1.0f/softcap);
        kq = ggml_tanh(ctx, kq);
        kq = ggml_scale(ctx, kq, softcap);
    }
    if (kq_b) {
        ggml_tensor * bw = ggml_view_4d(ctx, kq_b, kq_b->ne[0], n_window, kq_b->ne[2], kq_b->ne[3],
                                        kq_b->nb[1], kq_b->nb[2], kq_b->nb[3], off*kq_b->nb[1]);
        kq = ggml_add(ctx, kq, bw);
    }

    ggml_tensor * mw = nullptr;
    if (kq_mask) {
        // rows [off, off + n_window) of the mask: a contiguous block while ne[2] == ne[3] == 1
        if (kq_mask->ne[2] != 1 || kq_mask->ne[3] != 1) {
            return nullptr;
        }
        mw = ggml_view_2d(ctx, kq_mask, kq_mask->ne[0], n_window, kq_mask->nb[1], off*kq_mask->nb[1]);
    }

    ggml_tensor * probs = ggml_soft_max_ext(ctx, kq, mw, kq_scale, max_alibi_bias);
    ggml_soft_max_add_sinks(probs, sinks);

    return window_scores(ctx, probs, mode);
}

ggml_tensor * pyasl_window_scores_from_probs(
        ggml_context * ctx,
        ggml_tensor * probs,
        int32_t n_window,
        int32_t mode) {
    const int64_t n_tokens = probs->ne[1];
    if (n_window <= 0 || n_tokens < n_window || probs->ne[3] != 1 || (mode != 0 && mode != 1)) {
        return nullptr;
    }
    return window_scores(ctx, rows(ctx, probs, n_tokens - n_window, n_window), mode);
}
