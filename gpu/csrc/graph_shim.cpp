// CUDA-graph shim for blyan-gpu: a C ABI over libtorch's at::cuda::CUDAGraph,
// which tch does not expose. Every entry point catches C++ exceptions and
// returns 0 on success, or 1 with a message written into `err`.
#include <ATen/Context.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>

#include <cuda_runtime.h>
#include <dlfcn.h>
#include <nvrtc.h>

#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
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
const char* kKernelSource =
#include "kernels.cuh"
    ;

cudaKernel_t k_qk = nullptr;
cudaKernel_t k_silu = nullptr;
cudaKernel_t k_attn = nullptr;

void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
  }
}

// NVRTC dlopens libnvrtc-builtins by bare name when it compiles; a
// binary's RUNPATH does not apply to that call, so without LD_LIBRARY_PATH it
// is not found. Loading it first from NVRTC's own directory makes the bare
// name resolve to the loaded library. Best effort: a failure here shows as
// NVRTC's own error.
void preload_nvrtc_builtins() {
  static bool done = false;
  if (done) return;
  done = true;
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&nvrtcVersion), &info) == 0 || info.dli_fname == nullptr) return;
  std::string dir(info.dli_fname);
  dir = dir.substr(0, dir.rfind('/') + 1);
  int major = 0, minor = 0;
  if (nvrtcVersion(&major, &minor) != NVRTC_SUCCESS) return;
  std::string name = dir + "libnvrtc-builtins.so." + std::to_string(major) + "." + std::to_string(minor);
  dlopen(name.c_str(), RTLD_NOW | RTLD_GLOBAL);
}

// The kernels as PTX for compute capability major.minor (no device needed).
std::string compile_ptx(int major, int minor) {
  preload_nvrtc_builtins();
  nvrtcProgram prog;
  if (nvrtcCreateProgram(&prog, kKernelSource, "blyan_kernels.cu", 0, nullptr, nullptr) != NVRTC_SUCCESS) {
    throw std::runtime_error("nvrtcCreateProgram failed");
  }
  std::string arch = "--gpu-architecture=compute_" + std::to_string(major) + std::to_string(minor);
  const char* opts[] = {arch.c_str(), "--std=c++17"};
  nvrtcResult r = nvrtcCompileProgram(prog, 2, opts);
  if (r != NVRTC_SUCCESS) {
    size_t n = 0;
    nvrtcGetProgramLogSize(prog, &n);
    std::string log(n, '\0');
    nvrtcGetProgramLog(prog, log.data());
    nvrtcDestroyProgram(&prog);
    throw std::runtime_error("NVRTC: " + log);
  }
  size_t n = 0;
  nvrtcGetPTXSize(prog, &n);
  std::string ptx(n, '\0');
  nvrtcGetPTX(prog, ptx.data());
  nvrtcDestroyProgram(&prog);
  return ptx;
}

void compile_kernels() {
  int dev = 0;
  cuda_check(cudaGetDevice(&dev), "cudaGetDevice");
  cudaDeviceProp prop;
  cuda_check(cudaGetDeviceProperties(&prop, dev), "cudaGetDeviceProperties");
  std::string ptx = compile_ptx(prop.major, prop.minor);
  cudaLibrary_t lib;
  cuda_check(cudaLibraryLoadData(&lib, ptx.data(), nullptr, nullptr, 0, nullptr, nullptr, 0),
             "cudaLibraryLoadData");
  cuda_check(cudaLibraryGetKernel(&k_qk, lib, "qk_norm_rope_kv"), "get qk_norm_rope_kv");
  cuda_check(cudaLibraryGetKernel(&k_silu, lib, "silu_mul"), "get silu_mul");
  cuda_check(cudaLibraryGetKernel(&k_attn, lib, "decode_attn"), "get decode_attn");
}
}  // namespace

extern "C" {
// Compiles the fused kernels (once) for the current device.
int blyan_kernels_init(char* err, size_t len) {
  return guarded([] {
    if (k_qk == nullptr) compile_kernels();
  }, err, len);
}

// Compiles the kernel source for compute capability major.minor and drops
// the result: a check that needs no device (gpu/src/sys.rs tests).
int blyan_kernels_compile_check(int major, int minor, char* err, size_t len) {
  return guarded([=] { (void)compile_ptx(major, minor); }, err, len);
}

// See kernels.cuh. Pointers are device pointers of contiguous tensors on
// CUDA device `device`; launched on libtorch's current stream of that
// device (so it is captured with the rest).
int blyan_qk_norm_rope_kv(const void* qkv, const void* w, const void* cos_t, const void* sin_t,
                          const void* pos, void* k_cache, void* v_cache, void* q_out, int batch,
                          int nh, int nkv, int hd, int max_len, float eps, int device, char* err,
                          size_t len) {
  return guarded([&] {
    if (k_qk == nullptr) throw std::runtime_error("kernels not initialised");
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    void* args[] = {(void*)&qkv, (void*)&w, (void*)&cos_t, (void*)&sin_t, (void*)&pos,
                    (void*)&k_cache, (void*)&v_cache, (void*)&q_out, &nh, &nkv, &hd, &max_len, &eps};
    dim3 grid(batch, nh + 2 * nkv), block(hd / 2);
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    cuda_check(cudaLaunchKernel((const void*)k_qk, grid, block, args, 0, stream), "launch qk_norm_rope_kv");
  }, err, len);
}

int blyan_decode_attn(const void* q, const void* k_cache, const void* v_cache, const void* pos,
                      void* out, int batch, int nh, int nkv, int hd, int max_len, int device,
                      char* err, size_t len) {
  return guarded([&] {
    if (k_attn == nullptr) throw std::runtime_error("kernels not initialised");
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    void* args[] = {(void*)&q, (void*)&k_cache, (void*)&v_cache, (void*)&pos, (void*)&out,
                    &nh, &nkv, &hd, &max_len};
    const int threads = 1024;
    dim3 grid(batch, nh), block(threads);
    size_t shared = (size_t)(max_len + hd + 64 + threads) * sizeof(float);
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    cuda_check(cudaLaunchKernel((const void*)k_attn, grid, block, args, shared, stream), "launch decode_attn");
  }, err, len);
}

int blyan_silu_mul(const void* gu, void* act, int inter, long long n, int device, char* err,
                   size_t len) {
  return guarded([&] {
    if (k_silu == nullptr) throw std::runtime_error("kernels not initialised");
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    void* args[] = {(void*)&gu, (void*)&act, &inter, &n};
    dim3 grid((unsigned)((n + 255) / 256)), block(256);
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    cuda_check(cudaLaunchKernel((const void*)k_silu, grid, block, args, 0, stream), "launch silu_mul");
  }, err, len);
}

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
