//! cl-controlplane entry point.
fn main() -> anyhow::Result<()> {
    controlplane::process::main_with(std::env::args_os())
}
