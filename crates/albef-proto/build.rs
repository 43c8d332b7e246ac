//! Compiles proto/albef/v1 with protoc (which `make setup` installs; the TensorBoard event protos
//! need it too) and generates the tonic services; also writes the encoded descriptor set for gRPC
//! server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = ["albef/v1/coordinator.proto", "albef/v1/control.proto"].map(|f| root.join(f));
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("albef_descriptor.bin"))
        .compile_protos(&files, &[root])?;
    Ok(())
}
