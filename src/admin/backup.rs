//! `GET /api/backup`: a snapshot of the store, streamed while the service serves on.
//!
//! The export is taken when the request arrives (everything answered before is in it) and
//! written on a blocking thread into a small channel that the response body drains: a slow
//! reader slows the export, never fills memory. One backup at a time; a second gets `409`. A
//! client that goes away ends the export, and with it the pin it holds on the store.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;

use crate::delivery::now_ms;
use crate::http::AppState;
use crate::store::StoreError;

/// Bytes sent to the body at a time.
const CHUNK: usize = 256 << 10;
/// Chunks waiting for the client at most.
const CHUNKS_WAITING: usize = 4;

/// Set while a backup runs.
static RUNNING: AtomicBool = AtomicBool::new(false);

/// Clears [`RUNNING`] when dropped.
struct Running;

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING.store(false, Ordering::SeqCst);
    }
}

pub(super) async fn backup(State(state): State<AppState>) -> Response {
    if RUNNING.swap(true, Ordering::SeqCst) {
        return (StatusCode::CONFLICT, "A backup is already running; try again once it ends.").into_response();
    }
    let running = Running;
    let export = match state.delivery.store().export().await {
        Ok(export) => export,
        Err(StoreError::Unsupported(why)) => return (StatusCode::NOT_IMPLEMENTED, why).into_response(),
        Err(e) => {
            tracing::error!(error.message = %e, "backup refused by the store");
            return (StatusCode::SERVICE_UNAVAILABLE, format!("Backup not started: {e}")).into_response();
        }
    };
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(CHUNKS_WAITING);
    let started = std::time::Instant::now();
    tokio::task::spawn_blocking(move || {
        let _running = running;
        let out = Chunks { tx: tx.clone(), buf: Vec::with_capacity(CHUNK) };
        match crate::snapshot::write(export, out, now_ms()).and_then(|(summary, mut out)| {
            out.send()?;
            Ok(summary)
        }) {
            Ok(summary) => tracing::info!(
                devices = summary.devices,
                messages = summary.messages,
                took_ms = started.elapsed().as_millis() as u64,
                "backup sent"
            ),
            Err(e) => {
                tracing::warn!(error.message = %e, "backup ended before it was whole");
                let _ = tx.blocking_send(Err(e));
            }
        }
    });
    let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    }));
    let name = format!("attachment; filename=\"sio-push-{}.snapshot\"", now_ms() / 1000);
    ([(header::CONTENT_TYPE, "application/x-ndjson"), (header::CONTENT_DISPOSITION, name.as_str())], body)
        .into_response()
}

/// Buffers the snapshot into chunks for the response body; fails once the client is gone.
struct Chunks {
    tx: mpsc::Sender<std::io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl Chunks {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away"))
    }
}

impl Write for Chunks {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
