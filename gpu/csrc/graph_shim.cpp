// CUDA-graph shim for blyan-gpu: a C ABI over libtorch's at::cuda::CUDAGraph,
// which tch does not expose. Every entry point catches C++ exceptions and
// returns 0 on success, or 1 with a message written into `err`.
#include <ATen/Context.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAFunctions.h>

#include <cstring>
#include <exception>
#include <optional>

namespace {
std::optional<c10::cuda::CUDAStream> saved_stream;

int fail(const char* what, char* err, size_t len) {
  if (err != nullptr && len > 0) {
    std::strncpy(err, what, len - 1);
    err[len - 1] = '\0';
  }
  return 1;
}

template <typename F>
int guarded(F f, char* err, size_t len) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    return fail(e.what(), err, len);
  } catch (...) {
    return fail("unknown C++ exception", err, len);
  }
}
}  // namespace

extern "C" {
void* blyan_graph_new() {
  try {
    return new at::cuda::CUDAGraph();
  } catch (...) {
    return nullptr;
  }
}

void blyan_graph_free(void* g) { delete static_cast<at::cuda::CUDAGraph*>(g); }

int blyan_side_stream_enter(char* err, size_t len) {
  return guarded([] {
    saved_stream = c10::cuda::getCurrentCUDAStream();
    c10::cuda::setCurrentCUDAStream(c10::cuda::getStreamFromPool());
  }, err, len);
}

int blyan_side_stream_exit(char* err, size_t len) {
  return guarded([] {
    auto side = c10::cuda::getCurrentCUDAStream();
    side.synchronize();
    if (saved_stream) {
      c10::cuda::setCurrentCUDAStream(*saved_stream);
      saved_stream.reset();
    }
  }, err, len);
}

int blyan_graph_capture_begin(void* g, char* err, size_t len) {
  return guarded([g] { static_cast<at::cuda::CUDAGraph*>(g)->capture_begin(); }, err, len);
}

int blyan_graph_capture_end(void* g, char* err, size_t len) {
  return guarded([g] { static_cast<at::cuda::CUDAGraph*>(g)->capture_end(); }, err, len);
}

int blyan_graph_replay(void* g, char* err, size_t len) {
  return guarded([g] { static_cast<at::cuda::CUDAGraph*>(g)->replay(); }, err, len);
}

// 0: libtorch's default choice, 1: cuBLAS, 2: cuBLASLt.
int blyan_set_blas_backend(int which, char* err, size_t len) {
  return guarded([which] {
    at::BlasBackend b = which == 1   ? at::BlasBackend::Cublas
                        : which == 2 ? at::BlasBackend::Cublaslt
                                     : at::BlasBackend::Default;
    at::globalContext().setBlasPreferredBackend(b);
  }, err, len);
}

int blyan_cuda_synchronize(char* err, size_t len) {
  return guarded([] { c10::cuda::device_synchronize(); }, err, len);
}
}
