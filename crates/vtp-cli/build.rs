//! With the `torch` feature (`vtp predict`), the binary and its tests get
//! an rpath to libtorch's directory (from torch-sys's `links` metadata), so
//! they run without `LD_LIBRARY_PATH`.
fn main() {
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
