//! A minimal socket.io protocol-5 client over websocket: connect to a namespace, answer pings,
//! acknowledge every event, and report `msg` events with their arrival time. Small on purpose:
//! one task and one websocket per client.

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

/// A `msg` event's first argument (the message number) and when it arrived.
pub struct Received {
    /// The message number.
    pub id: usize,
    /// Arrival time.
    pub at: Instant,
}

/// A connected client; dropping it closes the connection.
pub struct Client {
    task: JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    /// Connects to `/<ns>` with a token and device id; returns once `_settings` arrived (the
    /// device is then registered). `msg` events are reported on `received`.
    pub async fn connect(
        addr: SocketAddr,
        ns: &str,
        token: &str,
        device: &str,
        received: Option<mpsc::UnboundedSender<Received>>,
    ) -> anyhow::Result<Self> {
        let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket&token={token}&deviceId={device}");
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.context("websocket connect")?;
        let prefix = format!("/{ns},");
        loop {
            let Some(frame) = ws.next().await else { bail!("closed during the handshake") };
            let Message::Text(text) = frame? else { continue };
            match text.as_bytes().first() {
                Some(b'0') => ws.send(Message::text(format!("40{prefix}"))).await?,
                Some(b'2') => ws.send(Message::text("3")).await?,
                Some(b'4') if text.starts_with(&format!("44{prefix}")) => bail!("refused: {text}"),
                Some(b'4') if text.starts_with(&format!("42{prefix}[\"_settings\"")) => break,
                _ => {}
            }
        }
        let task = tokio::spawn(async move {
            while let Some(Ok(frame)) = ws.next().await {
                let Message::Text(text) = frame else { continue };
                if text.as_str() == "2" {
                    if ws.send(Message::text("3")).await.is_err() {
                        return;
                    }
                    continue;
                }
                let Some(rest) = text.strip_prefix("42").and_then(|r| r.strip_prefix(prefix.as_str())) else {
                    continue;
                };
                let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
                let (ack, payload) = rest.split_at(digits);
                if let (Some(tx), Some(id)) = (&received, msg_id(payload)) {
                    let _ = tx.send(Received { id, at: Instant::now() });
                }
                if !ack.is_empty() && ws.send(Message::text(format!("43{prefix}{ack}[]"))).await.is_err() {
                    return;
                }
            }
        });
        Ok(Self { task })
    }
}

/// The message number of `["msg", N]`, or of each entry of a `_batch`'s first one.
fn msg_id(payload: &str) -> Option<usize> {
    let value: serde_json::Value = serde_json::from_str(payload).ok()?;
    let items = value.as_array()?;
    match items.first()?.as_str()? {
        "msg" => items.get(1)?.as_u64().map(|n| n as usize),
        _ => None,
    }
}
