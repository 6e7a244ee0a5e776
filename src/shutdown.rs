//! What stops us: SIGINT or SIGTERM (systemd's stop). SIGHUP means reload (see `reload`), and
//! must never stop the process, not even before the reloader listens.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Cancels `token` when SIGINT or SIGTERM arrives. Call from within the runtime, early.
pub fn cancel_on_signal(token: CancellationToken) -> std::io::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    // tokio never unregisters a signal handler, so from here on SIGHUP no longer terminates the
    // process; the reloader takes it once the service is built.
    drop(signal(SignalKind::hangup())?);
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
            _ = token.cancelled() => return,
        };
        tracing::info!(signal = name, "shutting down");
        token.cancel();
    });
    Ok(())
}
