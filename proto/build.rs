//! Compiles `styxy/v1/styxy.proto` with protox (pure Rust: no protoc on the build machine), generates the
//! tonic client and server and the messages' canonical proto3 JSON mapping (pbjson: what `styxy --json`
//! prints, the same shapes as grpcurl), and writes the encoded file descriptor set that gRPC reflection
//! serves.
use anyhow::Context;
use prost::Message;

fn main() -> anyhow::Result<()> {
    let proto = "styxy/v1/styxy.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["."]).context("compiling styxy.proto")?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR is not set")?);
    let encoded = descriptors.encode_to_vec();
    std::fs::write(out_dir.join("styxy_descriptor.bin"), &encoded)
        .context("writing the file descriptor set")?;
    pbjson_build::Builder::new()
        .register_descriptors(&encoded)
        .context("reading the file descriptor set for pbjson")?
        .build(&[".styxy.v1"])
        .context("generating the proto3 JSON mapping")?;
    tonic_prost_build::configure()
        .compile_fds(descriptors)
        .context("generating Rust code from styxy.proto")?;
    Ok(())
}
