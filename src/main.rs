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
            eprint!("{}", backup::backup_command(&config, args).await?);
            Ok(())
        }),
        Command::Restore(args) => operate(args.data.sources(), |config| async move {
            eprint!("{}", backup::restore_command(&config, args).await?);
            Ok(())
        }),
        Command::Verify(args) => {
            operate(args.data.sources(), |config| async move { backup::verify_command(&config, args).await })
        }
        Command::ImportRedis(args) => operate(args.data.sources(), |config| async move {
            eprint!("{}", import::redis::command(&config, &args.redis_url).await?);
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
