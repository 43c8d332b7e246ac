fn main() {
    albef_build::link_libtorch();
}
