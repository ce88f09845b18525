//! The `keyturn` binary: parse the command line and hand over to the library.

// glibc's allocator spent a fifth of the CPU under load (measured with perf
// during `keyturn bench`); mimalloc is much cheaper for this many small allocations.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    keyturn::cli::main()
}
