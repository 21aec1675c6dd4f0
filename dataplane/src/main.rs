//! cl-dataplane entry point.
fn main() -> anyhow::Result<()> {
    dataplane::process::main_with(std::env::args_os())
}
