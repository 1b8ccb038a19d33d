//! With the `inference` feature the runtime's binaries and tests link
//! libtorch (through blyan-gpu). torch-sys tells only its direct dependents
//! where libtorch is (`DEP_TCH_LIBTORCH_LIB`), so this crate depends on it
//! directly to set an rpath, as blyan-gpu does for its own binaries; the
//! `blyan` binary then runs without LD_LIBRARY_PATH.
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo::rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
