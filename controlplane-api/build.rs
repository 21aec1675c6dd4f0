//! Generates the tonic/prost code from ../proto with protox, so no protoc is needed.
fn main() -> anyhow::Result<()> {
    let proto = "../proto/dataplane.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["../proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
