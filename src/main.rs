//! The `keyturn` binary: parse the command line and hand over to the library.

// glibc's allocator spent a fifth of the CPU under load (measured with perf
// during `keyturn bench`); mimalloc is much cheaper for this many small allocations.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // The process a run starts as (see `sandbox::child`): not a user
    // command, so it is dispatched before the CLI parses anything.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == keyturn::sandbox::child::SUBCOMMAND)
    {
        return keyturn::sandbox::child::main();
    }
    keyturn::cli::main()
}
