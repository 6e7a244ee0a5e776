//! Which sockets speak for each connected device, newest last.
//!
//! Only the newest socket of a device gets live messages; when it leaves, the next newest takes
//! over. A device counts as disconnected (in the store) once its last socket is gone. At most
//! `max_sockets_per_device` are kept: a new one beyond that evicts the oldest, so a client stuck
//! in a reconnect loop cannot pile up sockets. A std mutex: every use is one map operation.

use std::collections::HashMap;
use std::sync::Mutex;

use socketioxide::extract::SocketRef;
use socketioxide::socket::Sid;

use crate::store::DeviceKey;

/// What removing a socket meant for its device.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Removed {
    /// The socket was not registered for the device (evicted, or never registered).
    Unknown,
    /// Other sockets of the device remain.
    OthersRemain,
    /// It was the device's last socket.
    Last,
}

#[derive(Default)]
pub(super) struct DeviceSockets {
    map: Mutex<HashMap<DeviceKey, Vec<SocketRef>>>,
}

impl DeviceSockets {
    /// The socket that gets the device's live messages.
    pub(super) fn newest(&self, dev: &DeviceKey) -> Option<SocketRef> {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).get(dev).and_then(|s| s.last()).cloned()
    }

    /// Registers `socket` as the device's newest; returns the oldest if that exceeds `max`.
    pub(super) fn add(&self, dev: &DeviceKey, socket: SocketRef, max: usize) -> Option<SocketRef> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let sockets = map.entry(dev.clone()).or_default();
        sockets.push(socket);
        (sockets.len() > max.max(1)).then(|| sockets.remove(0))
    }

    /// Unregisters a socket of a device.
    pub(super) fn remove(&self, dev: &DeviceKey, sid: Sid) -> Removed {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let Some(sockets) = map.get_mut(dev) else { return Removed::Unknown };
        let before = sockets.len();
        sockets.retain(|s| s.id != sid);
        match (sockets.len() < before, sockets.is_empty()) {
            (false, _) => Removed::Unknown,
            (true, false) => Removed::OthersRemain,
            (true, true) => {
                map.remove(dev);
                Removed::Last
            }
        }
    }
}
