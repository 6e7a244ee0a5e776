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
        let tcp = tcp_from_own_address(addr, index).await.context("tcp connect")?;
        // tungstenite zero-fills its whole read buffer before every read: at the default 128 KiB
        // that memset was 40% of the generator's CPU in a fan-out. Frames here are tiny.
        let config = WebSocketConfig::default().read_buffer_size(4096);
        let (mut ws, _) =
            tokio_tungstenite::client_async_with_config(url, tcp, Some(config)).await.context("websocket connect")?;
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

/// Clients per loopback source address.
const CLIENTS_PER_SOURCE: usize = 2000;

/// A TCP connection to `addr` from a loopback address of the client's own (127.0.0.2 and up, a
/// new one every `CLIENTS_PER_SOURCE` clients). Real clients come from many addresses; from one,
/// the kernel's search for a free ephemeral port grows with every connection held and was 80% of
/// the generator's CPU at 19,000 clients, throttling the connect rate it measures.
async fn tcp_from_own_address(addr: SocketAddr, index: usize) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    // Leave the port to connect(), which picks one free for this address and destination.
    let on: libc::c_int = 1;
    // SAFETY: a valid socket, and an option value of the size given.
    unsafe {
        use std::os::fd::AsRawFd;
        let size = std::mem::size_of_val(&on) as libc::socklen_t;
        let value = (&on as *const libc::c_int).cast();
        libc::setsockopt(socket.as_raw_fd(), libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, value, size);
    }
    let source = 2 + (index / CLIENTS_PER_SOURCE) as u32;
    let ip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(127, 0, 0, 0)) + source);
    socket.bind(SocketAddr::from((ip, 0)))?;
    socket.connect(addr).await
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
