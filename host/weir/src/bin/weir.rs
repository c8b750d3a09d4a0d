//! The `weir` binary: the command line of `weir::cli`, with nothing else compiled in (no
//! fault injection: `WEIR_FAULT` means nothing to it).

fn main() -> std::process::ExitCode {
    weir::cli::main()
}
