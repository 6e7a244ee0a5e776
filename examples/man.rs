//! Prints the sio-push(1) man page, generated from the clap definitions. Used by
//! `packaging/build-deb.sh`: `cargo run --example man > sio-push.1`.

use clap::CommandFactory;

fn main() -> std::io::Result<()> {
    clap_mangen::Man::new(sio_push::cli::Cli::command()).render(&mut std::io::stdout())
}
