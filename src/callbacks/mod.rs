//! Calls to the customer's website: the auth endpoint and the presence callback.
//!
//! One shared reqwest client. Auth calls are bounded by a timeout and by a semaphore, so a
//! reconnect storm queues here instead of flooding the website; the queue is bounded too, in
//! length (`max_auth_queue`) and in time (`auth_timeout_ms`), and a client refused by either
//! hears why. Presence PUTs run in tasks of their own with a timeout, as many at once as auth
//! calls and at most `MAX_PRESENCE_PENDING` waiting: a slow or failing website never delays
//! delivery, it only gets a log line (and a PUT over the bound is dropped, with one).
//! Tokens go into headers and nowhere else: no log line carries one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::StatusCode;
use tokio::sync::Semaphore;

use crate::config::{ServerConfig, SiteConfig};

/// Why a connection was refused by auth. `Display` gives the exact text the client sees.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The auth endpoint answered 401.
    #[error("Authentication failed")]
    Failed,
    /// The auth endpoint answered another non-200 status.
    #[error("Auth {0} error")]
    Status(u16),
    /// The call failed or its answer was not a JSON array of strings.
    #[error("Auth error: {0}")]
    Other(String),
    /// A browser on an origin the site does not list in `allowed_origins`.
    #[error("Origin not allowed")]
    OriginNotAllowed,
    /// The site was removed by a reload while the client was connecting.
    #[error("Invalid namespace")]
    UnknownSite,
    /// Reliable mode, and none of the rooms is a user room or the public channel.
    #[error("User is missing a private room")]
    MissingUserRoom,
}

/// Presence transitions reported to `update_user_url`.
#[derive(Clone, Copy, Debug)]
pub enum Presence {
    /// A socket of the user connected.
    Connected,
    /// A socket of the user disconnected.
    Disconnected,
}

/// Presence PUTs that may wait for a free slot; more are dropped (logged). A user reconnecting
/// in a loop against a hung website would otherwise pile up tasks without bound.
const MAX_PRESENCE_PENDING: usize = 10_000;

/// The HTTP client for customer websites. Cheap to clone.
#[derive(Clone)]
pub struct Callbacks {
    client: reqwest::Client,
    auth_slots: Arc<Semaphore>,
    /// Connections waiting for an auth slot, and how many may.
    auth_waiting: Arc<AtomicUsize>,
    max_auth_queue: usize,
    auth_timeout: Duration,
    presence_slots: Arc<Semaphore>,
    /// Presence PUTs spawned and not finished.
    presence_pending: Arc<AtomicUsize>,
    callback_timeout: Duration,
}

/// Counts one waiter while it lives.
struct Waiting(Arc<AtomicUsize>);

impl Waiting {
    /// Counts one more, unless `max` are counted already.
    fn enter(count: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(Self(count.clone()))
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Callbacks {
    /// Builds the shared client from the server settings.
    pub fn new(server: &ServerConfig) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .connect_timeout(server.auth_timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("sio-push/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            client,
            auth_slots: Arc::new(Semaphore::new(server.max_concurrent_auth)),
            auth_waiting: Arc::default(),
            max_auth_queue: server.max_auth_queue,
            auth_timeout: server.auth_timeout,
            presence_slots: Arc::new(Semaphore::new(server.max_concurrent_auth)),
            presence_pending: Arc::default(),
            callback_timeout: server.callback_timeout,
        })
    }

    /// Asks the site's auth endpoint for the rooms of the client holding `token`, once an auth
    /// slot is free. Dropping the future (the client left) leaves the queue, or cancels the
    /// call under way.
    pub async fn rooms(&self, site: &SiteConfig, token: &str, meta: Option<&str>) -> Result<Vec<String>, AuthError> {
        let _slot = match self.auth_slots.try_acquire() {
            Ok(slot) => slot,
            Err(_) => {
                let _waiting = Waiting::enter(&self.auth_waiting, self.max_auth_queue).ok_or_else(|| {
                    crate::metrics::auth(&site.name, "busy", Duration::ZERO);
                    AuthError::Other(format!(
                        "too many connections waiting for authentication (server.max_auth_queue is {}); retry later",
                        self.max_auth_queue
                    ))
                })?;
                match tokio::time::timeout(self.auth_timeout, self.auth_slots.acquire()).await {
                    Ok(slot) => slot.map_err(|_| AuthError::Other("shutting down".into()))?,
                    Err(_) => {
                        crate::metrics::auth(&site.name, "busy", self.auth_timeout);
                        return Err(AuthError::Other(format!(
                            "no auth slot free within auth_timeout_ms ({} ms); retry later",
                            self.auth_timeout.as_millis()
                        )));
                    }
                }
            }
        };
        let started = std::time::Instant::now();
        let result = self.call_auth(site, token, meta).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(AuthError::Failed | AuthError::Status(_)) => "refused",
            Err(_) => "error",
        };
        crate::metrics::auth(&site.name, outcome, started.elapsed());
        result
    }

    async fn call_auth(&self, site: &SiteConfig, token: &str, meta: Option<&str>) -> Result<Vec<String>, AuthError> {
        let mut request = self
            .client
            .get(site.auth_url.clone())
            .timeout(self.auth_timeout)
            .header(AUTHORIZATION, authorization(site, token)?);
        if let Some(meta) = meta {
            let meta = HeaderValue::from_bytes(meta.as_bytes())
                .map_err(|_| AuthError::Other("meta holds characters not allowed in a header".into()))?;
            request = request.header("X-META", meta);
        }
        let response = request.send().await.map_err(|e| AuthError::Other(describe(e, self.auth_timeout)))?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED => return Err(AuthError::Failed),
            status => return Err(AuthError::Status(status.as_u16())),
        }
        let body = response.bytes().await.map_err(|e| AuthError::Other(describe(e, self.auth_timeout)))?;
        serde_json::from_slice::<Vec<String>>(&body)
            .map_err(|_| AuthError::Other("the auth endpoint did not answer a JSON array of strings".into()))
    }

    /// Reports a presence change to the site's `update_user_url`, in the background.
    pub fn presence(&self, site: &SiteConfig, user_room: &str, token: &str, what: Presence) {
        let Some(template) = &site.update_user_url else { return };
        let Some(id) = user_id(user_room) else { return };
        let url = template.replace(":id", id);
        let field = match what {
            Presence::Connected => "last_connected",
            Presence::Disconnected => "last_disconnected",
        };
        let now = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let body = serde_json::json!({ "id": id, "user": { field: now } });
        let Ok(auth) = authorization(site, token) else { return };
        let request = self
            .client
            .put(url)
            .timeout(self.callback_timeout)
            .header(AUTHORIZATION, auth)
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_string());
        let (site, user, timeout) = (site.name.clone(), user_room.to_owned(), self.callback_timeout);
        let Some(pending) = Waiting::enter(&self.presence_pending, MAX_PRESENCE_PENDING) else {
            crate::metrics::presence(&site, "dropped");
            tracing::warn!(%site, room = %user, field, "presence callback dropped: {MAX_PRESENCE_PENDING} are waiting already");
            return;
        };
        let slots = self.presence_slots.clone();
        tokio::spawn(async move {
            let _pending = pending;
            let Ok(_slot) = slots.acquire_owned().await else { return };
            match request.send().await {
                Ok(r) if r.status().is_success() => {
                    crate::metrics::presence(&site, "ok");
                    tracing::debug!(%site, room = %user, field, "presence callback sent")
                }
                Ok(r) => {
                    crate::metrics::presence(&site, "refused");
                    tracing::warn!(%site, room = %user, field, status = r.status().as_u16(), "presence callback refused")
                }
                Err(e) => {
                    crate::metrics::presence(&site, "error");
                    tracing::warn!(%site, room = %user, field, error.message = %describe(e, timeout), "presence callback failed")
                }
            }
        });
    }
}

/// `<scheme> <token>` as a header value.
fn authorization(site: &SiteConfig, token: &str) -> Result<HeaderValue, AuthError> {
    let mut value = HeaderValue::from_str(&format!("{} {}", site.auth_scheme, token))
        .map_err(|_| AuthError::Other("the token holds characters not allowed in a header".into()))?;
    value.set_sensitive(true);
    Ok(value)
}

/// The user id in a user room: after the first `_`, up to the next (`user_3_admin` -> `3`).
pub fn user_id(room: &str) -> Option<&str> {
    let (_, rest) = room.split_once('_')?;
    Some(rest.split('_').next().unwrap_or(rest))
}

/// A short reason for a failed call, without the URL's query.
fn describe(e: reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        format!("timed out after {}", humantime::format_duration(timeout))
    } else if e.is_connect() {
        "cannot connect to the auth endpoint".into()
    } else if e.is_body() || e.is_decode() {
        "the answer's body could not be read".into()
    } else {
        e.without_url().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_the_part_after_the_first_underscore() {
        assert_eq!(user_id("user_3_admin"), Some("3"));
        assert_eq!(user_id("user_42"), Some("42"));
        assert_eq!(user_id("user_"), Some(""));
        assert_eq!(user_id("browse"), None);
    }

    #[test]
    fn refusal_texts_are_the_old_services() {
        assert_eq!(AuthError::Failed.to_string(), "Authentication failed");
        assert_eq!(AuthError::Status(500).to_string(), "Auth 500 error");
        assert_eq!(AuthError::Other("x".into()).to_string(), "Auth error: x");
    }
}
