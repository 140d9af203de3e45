// What Baton's CPU decode kernels export to Python (bound in cpu_decode.cpp).
#pragma once

#include <torch/extension.h>

// cpu_matmul.cpp
torch::Tensor skinny_linear(torch::Tensor x, torch::Tensor w, int64_t N,
                            c10::optional<torch::Tensor> bias);
torch::Tensor skinny_linear_int8(torch::Tensor x, torch::Tensor w, torch::Tensor scale, int64_t N,
                                 c10::optional<torch::Tensor> bias);
torch::Tensor skinny_linear_int4(torch::Tensor x, torch::Tensor w, torch::Tensor sz, int64_t N,
                                 int64_t group, c10::optional<torch::Tensor> bias);
