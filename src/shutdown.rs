//! What stops us: SIGINT or SIGTERM (systemd's stop). SIGHUP is caught so that a reload request
//! never kills the process; until reload exists it only logs.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Cancels `token` when SIGINT or SIGTERM arrives. Call from within the runtime.
pub fn cancel_on_signal(token: CancellationToken) -> std::io::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = interrupt.recv() => "SIGINT",
                _ = terminate.recv() => "SIGTERM",
                _ = hangup.recv() => {
                    tracing::warn!("SIGHUP received: reloading the configuration is not supported yet; restart to apply changes");
                    continue;
                }
                _ = token.cancelled() => return,
            };
            tracing::info!(signal = name, "shutting down");
            token.cancel();
            return;
        }
    });
    Ok(())
}
