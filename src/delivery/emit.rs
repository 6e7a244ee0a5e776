//! What goes out to a device's socket besides `_settings` and `_batch` (live messages and
//! `_resync`), and how a failed emit is handled.

use std::sync::Arc;

use serde::ser::SerializeTuple;
use serde_json::Value;
use socketioxide::extract::SocketRef;
use socketioxide::SendError;

use super::ack::{AckArgs, Acks};
use crate::metrics;
use crate::store::{Ack, DeviceKey, MessageId};

/// A stored message on its way to the live sockets of its devices; one is shared by all of them.
#[derive(Debug)]
pub(super) struct LiveMessage {
    /// Its id in every queue it was stored in.
    pub id: MessageId,
    /// The socket.io event.
    pub event: Arc<str>,
    /// The event's arguments, spread into the emit.
    pub args: Vec<Value>,
    /// Its ack is checked for order (`resync=true`).
    pub resync: bool,
}

/// Something for a device's live socket, numbered like message ids so that a connect's
/// watermark can tell whether the connect took care of it.
#[derive(Clone, Debug)]
pub(super) enum Item {
    /// A message, by its id.
    Message(Arc<LiveMessage>),
    /// A `_resync` owed since this number (`store::Resync::seq`).
    Resync(MessageId),
}

impl Item {
    pub(super) fn seq(&self) -> MessageId {
        match self {
            Item::Message(msg) => msg.id,
            Item::Resync(seq) => *seq,
        }
    }
}

/// Serializes arguments so that socket.io spreads them: `emit(event, ...args)`.
pub(super) struct Spread<'a>(pub &'a [Value]);

impl serde::Serialize for Spread<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut tuple = serializer.serialize_tuple(self.0.len())?;
        for arg in self.0 {
            tuple.serialize_element(arg)?;
        }
        tuple.end()
    }
}

/// Emits `item` to the device's socket; a message's ack is watched by `acks`.
pub(super) fn emit(acks: &Arc<Acks>, socket: &SocketRef, dev: &DeviceKey, item: &Item) -> Result<(), SendError> {
    match item {
        Item::Message(msg) => {
            let ack = socket.emit_with_ack::<_, AckArgs>(&*msg.event, &Spread(&msg.args))?;
            let checked = msg.resync.then(|| msg.event.clone());
            acks.watch(ack, Ack::Live { device: dev.clone(), id: msg.id, checked });
            metrics::delivered_live(&dev.site, 1);
            Ok(())
        }
        Item::Resync(_) => send_resync(socket, &dev.site),
    }
}

/// Tells a client to resync (no arguments). Refused for a socket whose client has left (its
/// namespace disconnected, the transport maybe not yet closed): the resync stays owed.
pub(super) fn send_resync(socket: &SocketRef, site: &str) -> Result<(), SendError> {
    if !socket.connected() {
        return Err(SendError::Socket(socketioxide::SocketError::Closed));
    }
    socket.emit("_resync", &Spread(&[]))?;
    metrics::resync(site);
    Ok(())
}

/// Handles an emit that could not be queued for a socket; what it carried stays in the store.
/// A full buffer means the client stopped reading: it is disconnected (its transport closed,
/// so it reconnects and gets its `_batch`), so that neither it nor its buffer lingers until the
/// heartbeat times out. Call it outside the device's lock.
pub(super) fn emit_failed(socket: SocketRef, dev: &DeviceKey, e: &SendError) {
    use socketioxide::SocketError;
    if matches!(e, SendError::Socket(SocketError::InternalChannelFull)) {
        tracing::warn!(site = %dev.site, room = %dev.user, device = %dev.device, sid = %socket.id, "slow consumer: its buffer is full, disconnected; its messages stay queued");
        metrics::slow_consumer(&dev.site);
        let _ = socket.disconnect();
    } else {
        tracing::debug!(site = %dev.site, device = %dev.device, error.message = %e, "emit failed: the message stays queued");
    }
}
