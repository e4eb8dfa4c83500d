// Window-attention score graph (see pyasl-hooks.h). Only ggml ops: the same code runs on every backend.
#include "pyasl-hooks.h"

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
        ggml_tensor * t = ggml_cont(ctx, ggml_permute(ctx, kq, 1, 0, 2, 3));
        t = ggml_sum_rows(ctx, t);
        return ggml_reshape_2d(ctx, t, t->ne[1], t->ne[2]);
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

    if (mode == 1) {
        return probs;
    }
    // sum over the window queries: [n_kv, W, n_head] -> [W, n_kv, n_head] -> [1, n_kv, n_head]
    ggml_tensor * t = ggml_cont(ctx, ggml_permute(ctx, probs, 1, 0, 2, 3));
    t = ggml_sum_rows(ctx, t);
    return ggml_reshape_2d(ctx, t, t->ne[1], t->ne[2]);
}
