//! The `baton` binary: parse the command line, set up logs, run the
//! acceptor (or a subcommand). All the logic lives in the library
//! (`src/lib.rs`).

use std::process::ExitCode;

use baton::acceptor::{Acceptor, Outcome};
use baton::cli::{Cli, Sub};
use baton::options::Loader;
use clap::{CommandFactory, FromArgMatches};

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match cli.sub {
        Some(Sub::Ctl(args)) => match baton::ctl::run(&args) {
            Ok(out) => {
                println!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("baton ctl: error: {e}");
                ExitCode::FAILURE
            }
        },
        Some(Sub::Probe) => ExitCode::from(baton::audit::probe()),
        Some(Sub::StaticWorker { args }) => {
            let mut argv = vec![std::ffi::OsString::from("baton-static")];
            argv.extend(args);
            baton_static::main_from(argv)
        }
        Some(Sub::Audit(args)) => match baton::audit::run(&args) {
            Ok((text, pass)) => {
                println!("{text}");
                if pass {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("baton audit: error: {e}");
                ExitCode::from(2)
            }
        },
        Some(Sub::Keyd { args }) => baton_tls::keyd::main(args),
        Some(Sub::TlsCheck { files }) => {
            if files.len() % 2 != 0 {
                eprintln!("baton tls-check: error: give CERT KEY pairs");
                return ExitCode::from(2);
            }
            let pairs: Vec<baton_tls::KeyFiles> = files
                .chunks(2)
                .enumerate()
                .map(|(i, p)| baton_tls::KeyFiles {
                    id: i as u32 + 1,
                    cert: p[0].clone(),
                    key: p[1].clone(),
                })
                .collect();
            match baton_tls::KeyStore::load(&pairs) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("baton tls-check: error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Sub::UpgradeCheck(args)) => {
            let sub = matches
                .subcommand_matches("upgrade-check")
                .unwrap_or(&matches);
            match upgrade_check(&args, sub) {
                Ok(()) => {
                    println!("ok: can take over state version {}", args.state_version);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("baton upgrade-check: error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Sub::Check(args)) => {
            let sub = matches.subcommand_matches("check").unwrap_or(&matches);
            match Loader::new(&args.run, sub).and_then(|l| l.load().map(|c| (l, c))) {
                Ok((loader, cfg)) => {
                    // The keys too (this process serves nothing): each must
                    // load and match its certificate.
                    for p in &cfg.pools {
                        let Some(tls) = &p.tls else { continue };
                        let files: Vec<baton_tls::KeyFiles> = tls
                            .pairs
                            .iter()
                            .enumerate()
                            .map(|(i, (cert, key))| baton_tls::KeyFiles {
                                id: i as u32 + 1,
                                cert: cert.clone(),
                                key: key.clone(),
                            })
                            .collect();
                        if let Err(e) = baton_tls::KeyStore::load(&files) {
                            eprintln!("baton check: error: pool `{}`: {e}", p.name);
                            return ExitCode::FAILURE;
                        }
                    }
                    let what = match loader.config_path() {
                        Some(p) => format!("{} and the flags", p.display()),
                        None => "the flags (no --config)".to_string(),
                    };
                    let describe = |p: &baton::config::PoolConfig| {
                        format!(
                            "{} listener{}, {} worker{} of {}, balance {}",
                            p.listen.len(),
                            plural(p.listen.len()),
                            p.workers,
                            plural(p.workers),
                            p.command.program.display(),
                            p.balance
                        )
                    };
                    match cfg.pools.as_slice() {
                        [one] => println!("{what}: ok ({})", describe(one)),
                        pools => {
                            println!("{what}: ok ({} pools)", pools.len());
                            for p in pools {
                                println!("  pool {}: {}", p.name, describe(p));
                            }
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("baton check: error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        None => match Loader::new(&cli.run, &matches) {
            Ok(loader) => run(loader),
            Err(e) => {
                eprintln!("baton: error: {e}");
                ExitCode::from(2)
            }
        },
    }
}

/// What a running baton asks of the binary it is about to execute: the
/// state version is one this binary reads, and its configuration loads and
/// still has every pool the running one has.
fn upgrade_check(
    args: &baton::cli::UpgradeCheckArgs,
    matches: &clap::ArgMatches,
) -> Result<(), String> {
    use baton::acceptor::upgrade::STATE_VERSION;
    if args.state_version != STATE_VERSION {
        return Err(format!(
            "the running baton hands over state version {}, this binary reads version {STATE_VERSION}: stop and start instead",
            args.state_version
        ));
    }
    let cfg = Loader::new(&args.run, matches)
        .and_then(|l| l.load())
        .map_err(|e| format!("the configuration does not load: {e}"))?;
    let missing: Vec<&String> = args
        .pools
        .iter()
        .filter(|n| !cfg.pools.iter().any(|p| &p.name == *n))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the configuration no longer has pool(s) {missing:?}: remove them with a reload first"
        ));
    }
    Ok(())
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn run(loader: Loader) -> ExitCode {
    let cfg = match loader.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("baton: error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = baton::logging::init(cfg.log_format, &cfg.log_level) {
        eprintln!("baton: error: {e}");
        return ExitCode::from(2);
    }
    // Socket activation, while the process is still single-threaded.
    let inherited = baton::systemd::take_listeners();
    // Every worker spawned from now on logs in the same format. Set while
    // this process is still single-threaded.
    std::env::set_var(baton_sdk::log::FORMAT_ENV, cfg.log_format.as_str());
    for p in &cfg.pools {
        if let Some(note) = &p.sandbox.note {
            tracing::info!(pool = %p.name, "{note}");
        }
    }
    match baton::sandbox::reduce_own_capabilities() {
        Ok(kept) if !kept.is_empty() => {
            tracing::info!(kept = ?kept, "acceptor capabilities reduced")
        }
        Ok(_) => {}
        Err(e) => {
            tracing::error!(error = %e, "cannot drop the acceptor's capabilities");
            eprintln!("baton: error: cannot drop capabilities: {e}");
            return ExitCode::FAILURE;
        }
    }
    // After `ctl upgrade`, the image that executed this one left its state.
    let result = match baton::acceptor::upgrade::take_state() {
        Ok(Some(state)) => Acceptor::resume(cfg, state),
        Ok(None) => Acceptor::new(cfg, inherited),
        Err(e) => {
            tracing::error!(error = %e, "cannot take over from the upgrading image");
            eprintln!("baton: error: {e}");
            return ExitCode::FAILURE;
        }
    }
    .and_then(|a| a.with_reload(loader).run());
    match result {
        Ok(Outcome::Graceful) => ExitCode::SUCCESS,
        Ok(Outcome::Forced) => ExitCode::from(1),
        Err(e) => {
            tracing::error!(error = %e, "baton stopped");
            eprintln!("baton: error: {e}");
            ExitCode::FAILURE
        }
    }
}
