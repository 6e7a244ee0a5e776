//! The `sio-push` binary: parse the command line, load the config, run.

use std::process::ExitCode;

use clap::Parser;
use sio_push::cli::{Cli, Command};
use sio_push::{shutdown, telemetry, Config};
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
                sio_push::run(config, token).await
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
