//! `demo-client` binary: see the library's [`demo_client::cli`].

fn main() -> std::process::ExitCode {
    demo_client::cli::main()
}
