//! The extension module finds libtorch through two rpaths: the torch wheel
//! it was built against (from torch-sys's `links` metadata; what
//! `maturin develop` needs) and `$ORIGIN/../torch/lib`, the torch package
//! beside `vtp/` in the same site-packages (what a wheel install needs).
fn main() {
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN/../torch/lib");
}
