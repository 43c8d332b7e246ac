fn main() {
    albef_build::link_libtorch();
    // Where NCCL's error message tells the user to link libnccl.so.
    println!("cargo:rustc-env=ALBEF_LIBTORCH_LIB={}", albef_build::libtorch_lib_dir().display());
}
