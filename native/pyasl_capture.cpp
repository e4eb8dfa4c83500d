// Score capture through the scheduler's eval callback: copies the named per-layer tensors to host
// memory with ggml_backend_tensor_get, so CPU, CUDA and Metal buffers are read the same way.
#include "pyasl_common.h"
#include "pyasl-hooks.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

namespace {
thread_local std::string g_last_error;
}

struct pyasl_capture_entry {
    std::string name;
    int32_t layer = -1;
    int64_t ne[4] = {1, 1, 1, 1};
    std::vector<float> data;
};
using entry = pyasl_capture_entry;

void pyasl_set_error(const std::string & msg) { g_last_error = msg; }

static int32_t name_layer(const char * name) {
    const char * dash = std::strrchr(name, '-');
    if (!dash || !dash[1]) {
        return -1;
    }
    int32_t v = 0;
    for (const char * p = dash + 1; *p; ++p) {
        if (*p < '0' || *p > '9' || v > 100000000) { // not a layer suffix (or one too long for int32)
            return -1;
        }
        v = v*10 + (*p - '0');
    }
    return v;
}

struct pyasl_capture {
    bool enabled = true;
    int32_t stop_layer = -1;
    std::vector<std::string> prefixes = {PYASL_SCORES_NAME};
    std::vector<entry> entries;
    std::map<std::string, size_t> index;
    std::vector<uint8_t> staging;

    bool wants(const char * name) const {
        for (const auto & p : prefixes) {
            const size_t n = p.size();
            if (std::strncmp(name, p.c_str(), n) == 0 && (name[n] == '\0' || name[n] == '-')) {
                return true;
            }
        }
        return false;
    }
};

extern "C" {

int32_t pyasl_abi_version(void) { return PYASL_ABI_VERSION; }

const char * pyasl_last_error(void) { return g_last_error.c_str(); }

pyasl_capture * pyasl_capture_new(void) { return new pyasl_capture(); }

void pyasl_capture_free(pyasl_capture * cap) { delete cap; }

void pyasl_capture_clear(pyasl_capture * cap) {
    if (cap) {
        cap->entries.clear();
        cap->index.clear();
    }
}

void pyasl_capture_set_enabled(pyasl_capture * cap, bool enabled) {
    if (cap) {
        cap->enabled = enabled;
    }
}

int32_t pyasl_capture_add_prefix(pyasl_capture * cap, const char * prefix) {
    if (!cap || !prefix || !*prefix) {
        PYASL_FAIL(PYASL_ERR_ARG, "pyasl_capture_add_prefix: null capture or empty prefix");
    }
    cap->prefixes.emplace_back(prefix);
    return PYASL_OK;
}

bool pyasl_capture_eval_cb(struct ggml_tensor * t, bool ask, void * user_data) {
    auto * cap = static_cast<pyasl_capture *>(user_data);
    if (cap && cap->stop_layer >= 0 && name_layer(t->name) > cap->stop_layer) {
        return ask ? true : false; // compute up to this node, then stop the split
    }
    if (!cap || !cap->enabled || !cap->wants(t->name)) {
        return ask ? false : true;
    }
    if (ask) {
        return true;
    }
    if (!ggml_is_contiguous(t) || t->buffer == nullptr) {
        return true; // not readable as one block: leave it out rather than guess
    }
    const auto * traits = ggml_get_type_traits(t->type);
    if (t->type != GGML_TYPE_F32 && (!traits || !traits->to_float)) {
        return true;
    }
    auto it = cap->index.find(t->name);
    size_t idx;
    if (it == cap->index.end()) {
        idx = cap->entries.size();
        cap->entries.emplace_back();
        cap->index[t->name] = idx;
    } else {
        idx = it->second;
    }
    entry & e = cap->entries[idx];
    e.name = t->name;
    e.layer = name_layer(t->name);
    for (int i = 0; i < 4; ++i) {
        e.ne[i] = t->ne[i];
    }
    const int64_t n = ggml_nelements(t);
    e.data.resize(n);
    if (t->type == GGML_TYPE_F32) {
        ggml_backend_tensor_get(t, e.data.data(), 0, ggml_nbytes(t));
    } else {
        cap->staging.resize(ggml_nbytes(t));
        ggml_backend_tensor_get(t, cap->staging.data(), 0, ggml_nbytes(t));
        traits->to_float(cap->staging.data(), e.data.data(), n);
    }
    return true;
}

void pyasl_capture_set_stop_layer(pyasl_capture * cap, int32_t stop_layer) {
    if (cap) {
        cap->stop_layer = stop_layer < 0 ? -1 : stop_layer;
    }
}

int32_t pyasl_capture_count(const pyasl_capture * cap) { return cap ? (int32_t) cap->entries.size() : 0; }

static const entry * get_entry(const pyasl_capture * cap, int32_t i) {
    if (!cap || i < 0 || (size_t) i >= cap->entries.size()) {
        pyasl_set_error("pyasl_capture: index out of range");
        return nullptr;
    }
    return &cap->entries[i];
}

const char * pyasl_capture_name(const pyasl_capture * cap, int32_t i) {
    const entry * e = get_entry(cap, i);
    return e ? e->name.c_str() : nullptr;
}

int32_t pyasl_capture_layer(const pyasl_capture * cap, int32_t i) {
    const entry * e = get_entry(cap, i);
    return e ? e->layer : PYASL_ERR_ARG;
}

int32_t pyasl_capture_shape(const pyasl_capture * cap, int32_t i, int64_t * ne4) {
    const entry * e = get_entry(cap, i);
    if (!e || !ne4) {
        return PYASL_ERR_ARG;
    }
    for (int j = 0; j < 4; ++j) {
        ne4[j] = e->ne[j];
    }
    return PYASL_OK;
}

int64_t pyasl_capture_read(const pyasl_capture * cap, int32_t i, float * dst, int64_t n) {
    const entry * e = get_entry(cap, i);
    if (!e || !dst || n < 0) {
        return PYASL_ERR_ARG;
    }
    const int64_t numel = (int64_t) e->data.size();
    std::memcpy(dst, e->data.data(), sizeof(float) * (size_t) (n < numel ? n : numel));
    return numel;
}

} // extern "C"
