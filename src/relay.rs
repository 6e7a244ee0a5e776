//! Cross-node delivery for nodes that share a Redis store: Redis pub/sub of our own.
//!
//! A stored message must be emitted, with an ack, by the node that holds the device's newest
//! socket. The store tells the sending node which devices are held elsewhere, and by which node
//! (`Enqueued::elsewhere`, from the device records the enqueue read and checked); the sender
//! publishes one [`Notice`] to each of those nodes' channels, `<prefix>:node:<id>`, and each
//! node offers what it receives to its own sockets exactly as a local send would. A message to
//! the plain broadcast mode goes to `<prefix>:all`, which every node emits to its sockets in
//! the rooms.
//!
//! socketioxide-redis (the adapter of our socket.io engine) broadcasts events to rooms; it does
//! not route an emit with an ack to the one socket that speaks for a device, through that
//! node's connect gate and watermark, and it would make `SocketIo` generic over an adapter in
//! every module. These few lines do what delivery needs.
//!
//! Pub/sub is at most once: a notice published while a node's subscription is down (Redis
//! restarting, a network cut) is lost, and its message waits in the device's queue. So when a
//! node's subscription comes back after a gap, it closes the transport of each of its sockets
//! whose device has messages queued: the client reconnects, as after a network failure, and
//! gets them in its `_batch`. A node counts such gaps (`sio_push_relay_gaps_total`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::store::redis::{once_more_if_unsent, Target};
use crate::store::MessageId;

/// Notices waiting for delivery on a node; past it a notice is dropped (the message stays queued).
const BACKLOG: usize = 65_536;

/// What one node tells another.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t")]
pub enum Notice {
    /// A stored message for devices whose newest socket is on the receiving node.
    #[serde(rename = "m")]
    Message {
        /// The site.
        site: String,
        /// Its id in every queue.
        id: MessageId,
        /// The socket.io event.
        event: String,
        /// Its arguments.
        args: Vec<Value>,
        /// Its ack is checked for order.
        resync: bool,
        /// (user room, device, the message it follows in the device's queue) of each device.
        devices: Vec<(String, String, MessageId)>,
    },
    /// A message of the plain broadcast mode, for every node's sockets in the rooms.
    #[serde(rename = "b")]
    Broadcast {
        /// The node that sent it (which emitted to its own sockets already).
        from: String,
        /// The site.
        site: String,
        /// The rooms.
        rooms: Vec<String>,
        /// The socket.io event.
        event: String,
        /// Its arguments.
        args: Vec<Value>,
    },
}

/// What the relay hands to delivery.
#[derive(Debug)]
pub enum Relayed {
    /// A notice from another node.
    Notice(Notice),
    /// The subscription is back after a gap: notices published meanwhile were missed.
    Resumed,
}

/// One node's end of the relay.
pub struct Relay {
    publisher: crate::store::redis::Conn,
    prefix: String,
    node: String,
    subscribed: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    /// Starts listening on this node's channels; what arrives comes out of the receiver.
    pub async fn start(
        target: &Target,
        prefix: &str,
        node: &str,
    ) -> redis::RedisResult<(Self, mpsc::Receiver<Relayed>)> {
        let publisher = crate::store::redis::Conn::open(target).await?;
        let (tx, rx) = mpsc::channel(BACKLOG);
        let subscribed = Arc::new(AtomicBool::new(false));
        let channels = vec![format!("{prefix}:node:{node}"), format!("{prefix}:all")];
        let task = tokio::spawn(listen(target.urls.clone(), channels, tx, subscribed.clone()));
        let relay = Self { publisher, prefix: prefix.to_owned(), node: node.to_owned(), subscribed, task };
        Ok((relay, rx))
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The node is subscribed (for `/readyz`).
    pub fn is_subscribed(&self) -> bool {
        self.subscribed.load(Ordering::Relaxed)
    }

    /// Sends a notice to one node.
    pub async fn to_node(&self, node: &str, notice: &Notice) -> redis::RedisResult<()> {
        self.publish(format!("{}:node:{node}", self.prefix), notice).await
    }

    /// Sends a notice to every node.
    pub async fn to_all(&self, notice: &Notice) -> redis::RedisResult<()> {
        self.publish(format!("{}:all", self.prefix), notice).await
    }

    async fn publish(&self, channel: String, notice: &Notice) -> redis::RedisResult<()> {
        let payload = serde_json::to_string(notice).expect("a notice serializes");
        let publish = redis::cmd("PUBLISH").arg(channel).arg(payload).clone();
        once_more_if_unsent(|| async { publish.query_async::<()>(&mut self.publisher.clone()).await }).await
    }
}

/// Keeps a subscription up, trying the URLs in turn (any node of a cluster relays every
/// message), and hands what arrives to `tx`.
async fn listen(urls: Vec<String>, channels: Vec<String>, tx: mpsc::Sender<Relayed>, subscribed: Arc<AtomicBool>) {
    let mut attempt = 0usize;
    let mut had = false;
    loop {
        let url = &urls[attempt % urls.len()];
        attempt += 1;
        let subscription = async {
            let mut pubsub = redis::Client::open(url.as_str())?.get_async_pubsub().await?;
            for channel in &channels {
                pubsub.subscribe(channel).await?;
            }
            Ok::<_, redis::RedisError>(pubsub)
        };
        match tokio::time::timeout(Duration::from_secs(5), subscription).await {
            Ok(Ok(pubsub)) => {
                if had {
                    tracing::warn!("relay subscription back after a gap");
                    crate::metrics::relay_gap();
                    if tx.send(Relayed::Resumed).await.is_err() {
                        return;
                    }
                }
                had = true;
                subscribed.store(true, Ordering::Relaxed);
                let mut stream = pubsub.into_on_message();
                while let Some(msg) = stream.next().await {
                    match serde_json::from_slice::<Notice>(msg.get_payload_bytes()) {
                        Ok(notice) => {
                            if tx.try_send(Relayed::Notice(notice)).is_err() {
                                if tx.is_closed() {
                                    return;
                                }
                                tracing::warn!("relay backlog full: a notice dropped, its message stays queued");
                            }
                        }
                        Err(e) => tracing::warn!(error.message = %e, "unreadable relay notice ignored"),
                    }
                }
                subscribed.store(false, Ordering::Relaxed);
                tracing::warn!("relay subscription lost: reconnecting");
            }
            Ok(Err(e)) => {
                subscribed.store(false, Ordering::Relaxed);
                tracing::debug!(error.message = %e, "relay subscription failed");
            }
            Err(_) => subscribed.store(false, Ordering::Relaxed),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
