//! Compiles the autocast shim against the libtorch that torch-sys found
//! (its `links` metadata names the library directory; the headers sit
//! beside it, as in the PyTorch wheel and the libtorch archive).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/autocast.cpp");
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB")
            .expect("torch-sys names libtorch's library directory (DEP_TCH_LIBTORCH_LIB)"),
    );
    let root = lib.parent().expect("libtorch's lib directory has a parent");
    let include = root.join("include");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    // PyTorch's wheels are built with the C++11 ABI since 2.7 (torch-sys
    // asks Python; this follows its override). The shim passes only
    // integers across, but its headers must agree with the library.
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    cc::Build::new()
        .cpp(true)
        .file("csrc/autocast.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .warnings(false)
        .compile("vtp_autocast");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    // This crate's own tests run without LD_LIBRARY_PATH.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}
