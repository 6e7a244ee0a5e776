//! A minimal socket.io protocol-5 client over websocket: connect to a namespace, answer pings,
//! acknowledge every event, and report `msg` events with their arrival time. Small on purpose:
//! one task and one websocket per client.

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// A `msg` event's first argument (the message number) and when it arrived.
pub struct Received {
    /// Which client got it.
    pub client: usize,
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
    /// Client `index` is user `user_<index>` (token `u<index>`) with device `d<index>`.
    pub async fn connect(
        addr: SocketAddr,
        ns: &str,
        index: usize,
        received: Option<mpsc::UnboundedSender<Received>>,
    ) -> anyhow::Result<Self> {
        let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket&token=u{index}&deviceId=d{index}");
        // tungstenite zero-fills its whole read buffer before every read: at the default 128 KiB
        // that memset was 40% of the generator's CPU in a fan-out. Frames here are tiny.
        let config = WebSocketConfig::default().read_buffer_size(16384);
        let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), false)
            .await
            .context("websocket connect")?;
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
                if let Some(tx) = &received {
                    let at = Instant::now();
                    for id in msg_ids(payload) {
                        let _ = tx.send(Received { client: index, id, at });
                    }
                }
                if !ack.is_empty() && ws.send(Message::text(format!("43{prefix}{ack}[]"))).await.is_err() {
                    return;
                }
            }
        });
        Ok(Self { task })
    }
}

/// The message numbers in `["msg", N]`, or in every `["msg", N]` entry of a `_batch`.
fn msg_ids(payload: &str) -> Vec<usize> {
    fn id(entry: &serde_json::Value) -> Option<usize> {
        let items = entry.as_array()?;
        (items.first()?.as_str()? == "msg").then(|| items.get(1)?.as_u64().map(|n| n as usize)).flatten()
    }
    let Ok(value) = serde_json::from_str::<serde_json::Value>(payload) else { return Vec::new() };
    match value.as_array().and_then(|items| Some((items.first()?.as_str()?, items))) {
        Some(("_batch", items)) => {
            items.get(1).and_then(|b| b.as_array()).map(|b| b.iter().filter_map(id).collect()).unwrap_or_default()
        }
        _ => id(&value).into_iter().collect(),
    }
}
