//! `baton-static`: the binary. Everything lives in the library; see
//! `baton_static` (and `baton-static --help`).

fn main() -> std::process::ExitCode {
    baton_static::main_from(std::env::args_os())
}
