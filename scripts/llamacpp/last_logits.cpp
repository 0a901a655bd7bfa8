// Prints llama.cpp's last-position logits for token ids given on stdin (one prompt per line),
// one line of space-separated floats per prompt. Used by scripts/llamacpp-fixtures as a second,
// independent check of anyq's forward pass.
#include <cstdio>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "llama.h"

int main(int argc, char ** argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: %s MODEL.gguf THREADS < prompts\n", argv[0]);
        return 2;
    }
    llama_backend_init();
    llama_model_params mparams = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(argv[1], mparams);
    if (!model) {
        std::fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    std::string line;
    while (std::getline(std::cin, line)) {
        std::vector<llama_token> ids;
        std::istringstream in(line);
        for (llama_token id; in >> id;) ids.push_back(id);
        if (ids.empty()) continue;
        // A fresh context per prompt: no state is shared between prompts.
        llama_context_params cparams = llama_context_default_params();
        cparams.n_ctx = 512;
        cparams.n_batch = 512;
        cparams.n_threads = cparams.n_threads_batch = std::stoi(argv[2]);
        llama_context * ctx = llama_init_from_model(model, cparams);
        if (!ctx || llama_decode(ctx, llama_batch_get_one(ids.data(), (int32_t) ids.size())) != 0) {
            std::fprintf(stderr, "decode failed\n");
            return 1;
        }
        const float * logits = llama_get_logits_ith(ctx, -1);
        for (int i = 0; i < n_vocab; ++i) std::printf(i ? " %.6g" : "%.6g", logits[i]);
        std::printf("\n");
        llama_free(ctx);
    }
    llama_model_free(model);
    return 0;
}
