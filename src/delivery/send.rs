//! `POST /send`'s side: store a message durably, then emit it to the live sockets of its devices.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::emit::{self, Item, LiveMessage, Spread};
use super::sockets::Offered;
use super::{forgotten, Delivery, Message, SendError, Sent};
use crate::config::SiteConfig;
use crate::metrics;
use crate::relay::Notice;
use crate::store::{DeviceKey, Idempotency, MessageId, Replay, StoreError};

impl Delivery {
    /// Delivers a message per PROTOCOL.md: queued and emitted in reliable mode, broadcast
    /// otherwise. Returns once every queued copy is durable.
    ///
    /// With an idempotency key (`Idempotency-Key` and a fingerprint of the request), a retry
    /// within `idempotency_window` does nothing and says so; the key is stored with the message.
    ///
    /// The work runs in a task of its own, which the caller only waits for: if the caller's
    /// future is dropped (the website hung up, the request timed out), a message that reached
    /// the store is still emitted to its live devices, and its acks still recorded.
    pub async fn send(
        self: &Arc<Self>,
        site: &Arc<SiteConfig>,
        msg: Message,
        key: Option<(String, u64)>,
    ) -> Result<Sent, SendError> {
        let (this, site) = (self.clone(), site.clone());
        tokio::spawn(async move { this.carry_out(&site, msg, key).await })
            .await
            .map_err(|e| SendError::Internal(e.to_string()))?
    }

    async fn carry_out(&self, site: &SiteConfig, msg: Message, key: Option<(String, u64)>) -> Result<Sent, SendError> {
        let entry: Arc<str> = msg.entry().into();
        if entry.len() > self.settings.max_message_bytes {
            return Err(SendError::TooLarge { size: entry.len(), max: self.settings.max_message_bytes });
        }
        let expiry = self.expiry();
        let window = self.settings.idempotency_window.as_millis() as u64;
        let idempotency =
            key.map(|(key, fingerprint)| Idempotency { key, fingerprint, expires_at: expiry.now + window });
        let users = if site.reliable() { self.targets(site, &msg.rooms).await? } else { Vec::new() };
        if users.is_empty() && idempotency.is_none() {
            if !site.reliable() {
                self.broadcast(site, &msg).await;
            }
            return Ok(Sent::default());
        }
        // Outside reliable mode this stores only the idempotency key.
        let limits = self.settings.queue_limits;
        let targets = users.len();
        let out = self.store.enqueue(&site.name, users, entry, expiry, limits, idempotency).await?;
        match out.replay {
            Some(Replay::Same) => {
                tracing::info!(site = %site.name, event = %msg.event, "retry with a known Idempotency-Key: nothing done");
                return Ok(Sent { replayed: true, ..Sent::default() });
            }
            Some(Replay::Different) => return Err(SendError::KeyReused),
            None => {}
        }
        if !site.reliable() {
            self.broadcast(site, &msg).await;
            return Ok(Sent::default());
        }
        out.expired.iter().for_each(forgotten);
        for (dev, dropped) in &out.overflowed {
            tracing::warn!(site = %dev.site, room = %dev.user, device = %dev.device, dropped, "queue full: oldest messages dropped, device will get _resync");
            metrics::dropped(&dev.site, *dropped);
        }
        let stored = out.devices.len();
        metrics::stored(&site.name, stored as u64);
        let Message { event, args, resync, .. } = msg;
        let follows: HashMap<&DeviceKey, MessageId> = out.devices.iter().zip(out.follows.iter().copied()).collect();
        let mut live = 0;
        if let Some((relay, _)) = &self.relay {
            for (node, devices) in &out.elsewhere {
                let notice = Notice::Message {
                    site: site.name.clone(),
                    id: out.id,
                    event: event.clone(),
                    args: args.clone(),
                    resync,
                    devices: devices
                        .iter()
                        .map(|d| (d.user.to_string(), d.device.to_string(), follows.get(d).copied().unwrap_or(0)))
                        .collect(),
                };
                match relay.to_node(node, &notice).await {
                    Ok(()) => {
                        metrics::relay_notice("sent");
                        live += devices.len();
                    }
                    Err(e) => {
                        tracing::warn!(site = %site.name, node = %node, error.message = %e, "live copy for another node not sent: the message waits in its devices' queues")
                    }
                }
            }
        }
        let elsewhere: HashSet<&DeviceKey> = out.elsewhere.iter().flat_map(|(_, devices)| devices).collect();
        let message = Arc::new(LiveMessage { id: out.id, event: event.into(), args, resync });
        let item = Item::Message(message.clone());
        for dev in out.devices.iter().filter(|dev| !elsewhere.contains(dev)) {
            let follows = follows.get(dev).copied();
            match self.sockets.offer(dev, &item, follows, |socket, item| emit::emit(&self.acks, socket, dev, item)) {
                Offered::Sent | Offered::Held => live += 1,
                Offered::Skipped | Offered::NoSocket => {}
                Offered::Failed(socket, e) => emit::emit_failed(socket, dev, &e),
            }
        }
        tracing::info!(site = %site.name, event = %message.event, id = out.id, users = targets, stored, live, "message stored");
        Ok(Sent { stored, live, replayed: false })
    }

    /// The user rooms a message goes to: its user rooms, and the users of its shared rooms,
    /// each once, in the order first named.
    pub(super) async fn targets(&self, site: &SiteConfig, rooms: &[String]) -> Result<Vec<String>, StoreError> {
        let mut users = Vec::new();
        for room in rooms {
            if site.is_user_room(room) {
                users.push(room.clone());
            } else {
                users.extend(self.store.users_in_room(&site.name, room).await?);
            }
        }
        // One room names each user once: only several can repeat one. (A fan-out to one big room
        // skips hashing every user.)
        if rooms.len() > 1 {
            let mut seen = HashSet::with_capacity(users.len());
            users.retain(|user| seen.insert(user.clone()));
        }
        Ok(users)
    }

    async fn broadcast(&self, site: &SiteConfig, msg: &Message) {
        let Some(ns) = self.io.of(format!("/{}", site.name)) else {
            return;
        };
        if msg.rooms.is_empty() {
            return;
        }
        match ns.to(msg.rooms.clone()).emit(&msg.event, &Spread(&msg.args)).await {
            Ok(()) => {
                tracing::info!(site = %site.name, event = %msg.event, rooms = msg.rooms.len(), "message broadcast")
            }
            Err(e) => tracing::warn!(site = %site.name, error.message = %e, "broadcast failed"),
        }
        if let Some((relay, _)) = &self.relay {
            let notice = Notice::Broadcast {
                from: relay.node().to_owned(),
                site: site.name.clone(),
                rooms: msg.rooms.clone(),
                event: msg.event.clone(),
                args: msg.args.clone(),
            };
            if let Err(e) = relay.to_all(&notice).await {
                tracing::warn!(site = %site.name, error.message = %e, "broadcast to the other nodes failed");
            }
        }
    }
}
