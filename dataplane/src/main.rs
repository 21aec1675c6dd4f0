//! cl-dataplane entry point.

/// mimalloc instead of glibc malloc: the relay frees and reallocates 64 KiB buffers
/// constantly, and glibc kept returning that memory to the kernel and faulting it
/// back in (about 17 % of gateway CPU in a bulk h2 transfer; see benches/README.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
fn main() -> anyhow::Result<()> {
    dataplane::process::main_with(std::env::args_os())
}
