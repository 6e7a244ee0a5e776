//! The `sio-push` binary: parse the command line, load the config, run.

use std::process::ExitCode;

use clap::Parser;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

use anyhow::Context;
use sio_push::cli::{Cli, Command, ImportArgs};
use sio_push::config::Sources;
use sio_push::{backup, import, ops, shutdown, telemetry, Config};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig(args) => match Config::load(&args.sources()) {
            Ok(config) => {
                print!("{config}");
                for warning in &config.warnings {
                    eprintln!("warning: {warning}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::ImportConfig(args) => import_config(&args),
        Command::Backup(args) => operate(args.data.sources(), |config| async move {
            let summary = match &args.data.data_dir {
                Some(_) => backup::backup_offline(&config, &args.output).await?,
                None => backup::backup_online(&config, args.admin_url, args.token, &args.output).await?,
            };
            let mut report = format!("wrote {}: ", args.output.display());
            backup::summarize(&summary, &mut report);
            eprint!("{report}");
            Ok(())
        }),
        Command::Restore(args) => operate(args.data.sources(), |config| async move {
            let restored = backup::restore(&config, &args.input, args.force).await?;
            let mut report = format!("restored {} into {}: ", args.input.display(), config.server.data_dir.display());
            backup::summarize(&restored.summary, &mut report);
            if let Some(aside) = restored.kept_aside {
                report.push_str(&format!(
                    "the earlier contents are in {} (remove it once you no longer need it)\n",
                    aside.display()
                ));
            }
            eprint!("{report}");
            Ok(())
        }),
        Command::Verify(args) => operate(args.data.sources(), |config| async move {
            let verified = backup::verify(&config, args.scratch.as_deref()).await?;
            print!("{}", verified.report);
            for damage in &verified.damage {
                println!("DAMAGE: {damage}");
            }
            match verified.damage.is_empty() {
                true => println!("no damage found"),
                false => anyhow::bail!(
                    "the data directory is damaged: restore the last backup (sio-push restore --force), or keep what \
                         reads with sio-push backup --data-dir and restore that"
                ),
            }
            Ok(())
        }),
        Command::ImportRedis(args) => operate(args.data.sources(), |config| async move {
            let started = std::time::Instant::now();
            let report = import::redis::import_into_data_dir(&config, &args.redis_url).await?;
            for (site, s) in &report.sites {
                eprintln!(
                    "site {site}: {} devices ({} disconnected), {} queued messages",
                    s.devices, s.disconnected, s.messages
                );
            }
            for (site, keys) in &report.other_sites {
                eprintln!("left: {keys} keys of site {site:?}, which the configuration does not name");
            }
            for left in &report.left {
                eprintln!("left: {left}");
            }
            eprintln!(
                "imported into {} in {:.1} s: {} records written, {} already there",
                config.server.data_dir.display(),
                started.elapsed().as_secs_f64(),
                report.loaded.written,
                report.loaded.skipped
            );
            Ok(())
        }),
        Command::Status(args) => {
            operate(Sources { file: args.config.clone(), ..Sources::default() }, |config| async move {
                print!("{}", ops::status(&config, args.admin_url, args.token).await?);
                Ok(())
            })
        }
        Command::Send(args) => {
            operate(Sources { file: args.config.clone(), ..Sources::default() }, |config| async move {
                let args_json = match &args.args {
                    Some(text) => Some(serde_json::from_str(text).context("--args is not JSON")?),
                    None => None,
                };
                let request = ops::SendRequest {
                    site: args.site.clone(),
                    rooms: args.rooms.clone(),
                    event: args.event.clone(),
                    args: args_json,
                    resync: args.resync,
                };
                println!("{}", ops::send(&config, args.url, args.api_key, &request).await?);
                Ok(())
            })
        }
        Command::Serve(args) => {
            let config = match Config::load(&args.sources()) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            telemetry::init(config.server.log_format);
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            let result = runtime.block_on(async {
                let token = CancellationToken::new();
                shutdown::cancel_on_signal(token.clone())?;
                sio_push::run(config, args.sources(), token).await
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error.cause_chain = ?e, "{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn import_config(args: &ImportArgs) -> ExitCode {
    let env = std::env::vars().collect();
    let imported = match import::import(args.config_yml.as_deref(), args.sites_yml.as_deref(), &env, &args.data_dir) {
        Ok(imported) => imported,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    for note in &imported.notes {
        eprintln!("note: {note}");
    }
    let Some(path) = &args.output else {
        print!("{}", imported.toml);
        return ExitCode::SUCCESS;
    };
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o640)
        .open(path)
        .and_then(|mut file| file.write_all(imported.toml.as_bytes()));
    match written {
        Ok(()) => {
            eprintln!("wrote {}; check it with: sio-push check-config --config {}", path.display(), path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: cannot write {}: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}

/// Runs an operator command with the configuration it takes its defaults from.
fn operate<F, Fut>(sources: Sources, command: F) -> ExitCode
where
    F: FnOnce(Config) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let config = match Config::load(&sources) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(command(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
