//! Generates the tonic/prost code for `proto/` with a vendored protoc, so no system protoc is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not compiled in: a build script compiled for one checkout is reused by
    // another checkout sharing the target dir, and must read that checkout's protos.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC from the environment.
    #[allow(unsafe_code)] // the only way to hand prost-build the vendored protoc path
    unsafe {
        std::env::set_var("PROTOC", protoc);
    }
    let files =
        [root.join("vow/v1/vow.proto"), root.join("vow/raft/v1/raft.proto"), root.join("vow/route/v1/route.proto")];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let descriptors = out.join("vow_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptors)
        .bytes(".vow.raft.v1")
        .compile_protos(&files, &[root])?;
    // The public API's messages also get serde impls in the protobuf JSON mapping
    // (lowerCamelCase names, bytes as base64, enums by name) for the HTTP gateway. Every field
    // is written, defaults included, so a record has the same shape whatever it holds.
    pbjson_build::Builder::new()
        .register_descriptors(&std::fs::read(&descriptors)?)?
        .emit_fields()
        .build(&[".vow.v1"])?;
    Ok(())
}
