//! Sets an rpath to libtorch (so binaries run without LD_LIBRARY_PATH) and
//! compiles the CUDA shim (`csrc/graph_shim.cpp`: CUDA graphs, and the fused
//! decode kernels of `csrc/kernels.cuh`, compiled at run time with NVRTC) when the CUDA headers
//! of PyPI's torch wheel are present. Without them the crate still builds and
//! runs; it just cannot capture CUDA graphs.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(blyan_cuda_graph)");
    println!("cargo::rerun-if-changed=csrc/graph_shim.cpp");
    println!("cargo::rerun-if-changed=csrc/kernels.cuh");
    println!("cargo::rerun-if-env-changed=BLYAN_NO_CUDA_GRAPH");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo::warning=DEP_TCH_LIBTORCH_LIB unset: no rpath, no CUDA-graph shim");
        return;
    };
    let lib = PathBuf::from(lib);
    println!("cargo::rustc-link-arg=-Wl,-rpath,{}", lib.display());
    let torch = lib.parent().expect("torch/lib has a parent").to_path_buf();
    let site = torch.parent().expect("torch has a parent").to_path_buf();
    let cu13 = site.join("nvidia/cu13");
    let triton = site.join("triton/backends/nvidia/include");
    let includes = [
        torch.join("include"),
        torch.join("include/torch/csrc/api/include"),
        cu13.join("include"),
        triton.clone(),
    ];
    let have_headers = includes.iter().all(|p| p.is_dir())
        && cu13.join("lib/libcudart.so.13").is_file()
        && cu13.join("lib/libnvrtc.so.13").is_file()
        && lib.join("libtorch_cuda.so").is_file();
    if !have_headers || std::env::var_os("BLYAN_NO_CUDA_GRAPH").is_some() {
        println!(
            "cargo::warning=CUDA headers/libraries not found next to {}: building without the CUDA-graph shim",
            lib.display()
        );
        return;
    }
    build_shim(&includes, &lib, &cu13.join("lib"));
}

fn build_shim(includes: &[PathBuf], torch_lib: &Path, cuda_lib: &Path) {
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .includes(includes)
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("csrc/graph_shim.cpp")
        .compile("blyan_graph_shim");
    println!("cargo::rustc-link-search=native={}", torch_lib.display());
    println!("cargo::rustc-link-search=native={}", cuda_lib.display());
    println!("cargo::rustc-link-lib=dylib=torch_cuda");
    println!("cargo::rustc-link-lib=dylib=c10_cuda");
    println!("cargo::rustc-link-lib=dylib=c10");
    println!("cargo::rustc-link-arg=-l:libcudart.so.13");
    println!("cargo::rustc-link-arg=-l:libnvrtc.so.13");
    println!("cargo::rustc-link-arg=-Wl,-rpath,{}", cuda_lib.display());
    println!("cargo::rustc-cfg=blyan_cuda_graph");
}
