//! An rpath to libtorch's directory (from torch-sys's `links` metadata), as
//! the workspace's binaries have, so the targets run without LD_LIBRARY_PATH.
fn main() {
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
