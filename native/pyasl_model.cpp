// Model facts llama.cpp keeps internal: which layers use sliding-window attention.
#include "pyasl_common.h"

#include "llama-model.h"
#include "llama-hparams.h"

#include <string>

extern "C" {

int32_t pyasl_model_swa_layers(const struct llama_model * model, bool * out, int32_t n_max) {
    if (!model || (!out && n_max > 0) || n_max < 0) {
        PYASL_FAIL(PYASL_ERR_ARG, "pyasl_model_swa_layers: bad arguments");
    }
    const auto & hp = model->hparams;
    const int32_t n_layer = (int32_t) hp.n_layer();
    const bool any = hp.swa_type != LLAMA_SWA_TYPE_NONE && hp.n_swa > 0;
    for (int32_t il = 0; il < n_layer && il < n_max; ++il) {
        out[il] = any && hp.is_swa((uint32_t) il);
    }
    return n_layer;
}

int32_t pyasl_model_swa_type(const struct llama_model * model) {
    if (!model) {
        PYASL_FAIL(PYASL_ERR_ARG, "pyasl_model_swa_type: null model");
    }
    return (int32_t) model->hparams.swa_type;
}

} // extern "C"
