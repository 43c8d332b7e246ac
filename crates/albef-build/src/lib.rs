//! Build-script helpers for crates whose binaries or tests link libtorch: their `build.rs` calls
//! `link_libtorch`, and `albef-torch-ext` finds the headers its shim compiles against through
//! `libtorch_lib_dir`. Nothing here is linked into a binary.
//!
//! torch-sys tells its direct dependents where libtorch lives (`DEP_TCH_LIBTORCH_LIB`;
//! `.cargo/config.toml` points it at the `.venv/libtorch` that `make setup` links). A binary needs
//! two things torch-sys does not give it: an rpath, so it runs without `LD_LIBRARY_PATH`, and
//! `--no-as-needed` linking of `libtorch_cuda`, which no symbol references directly and which the
//! linker would otherwise drop, leaving CUDA silently unavailable.

use std::path::{Path, PathBuf};

/// The libtorch library directory as reported by torch-sys.
///
/// Panics with a clear message when the calling crate does not depend on torch-sys directly.
pub fn libtorch_lib_dir() -> PathBuf {
    let dir = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("DEP_TCH_LIBTORCH_LIB is unset: the crate calling albef-build must depend on torch-sys");
    PathBuf::from(dir)
}

/// Emits the link arguments for every binary, test and bench of the calling package.
pub fn link_libtorch() {
    let lib = libtorch_lib_dir();
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // The CUDA wheel ships libtorch_cuda.so; a CPU-only libtorch does not, and needs nothing more.
    if has_library(&lib, "libtorch_cuda.so") {
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-ltorch");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    println!("cargo:rerun-if-env-changed=LIBTORCH");
}

fn has_library(dir: &Path, name: &str) -> bool {
    dir.join(name).exists()
}
