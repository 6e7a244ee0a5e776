//! sio-push: a socket.io push service with durable per-device inboxes.
#![warn(missing_docs)]

pub mod store;
pub mod telemetry;
