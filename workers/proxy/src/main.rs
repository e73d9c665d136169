//! `baton-proxy`: the binary. Everything lives in the library; see
//! `baton_proxy` (and `baton-proxy --help`).

fn main() -> std::process::ExitCode {
    baton_proxy::main_from(std::env::args_os())
}
