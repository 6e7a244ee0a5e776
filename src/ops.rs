//! The operator commands: `sio-push status` (a table from the admin API) and `sio-push send`
//! (a `POST /send` for ops and smoke tests). Both read their defaults (addresses, admin token,
//! a site's API key) from the same configuration the service uses.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::admin::Status;
use crate::config::Config;

/// `http://ADDR` for a listen address, with a wildcard address replaced by loopback.
pub fn local_url(addr: SocketAddr) -> String {
    url_for(addr, false)
}

/// `http(s)://ADDR` for a listen address, with a wildcard address replaced by loopback.
fn url_for(addr: SocketAddr, tls: bool) -> String {
    let ip = match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".parse().expect("literal"),
        ip if ip.is_unspecified() => "::1".parse().expect("literal"),
        ip => ip,
    };
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{}", SocketAddr::new(ip, addr.port()))
}

fn client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?)
}

/// The admin API's base URL and token: as given, else from the configuration.
fn admin_access(config: &Config, admin_url: Option<String>, token: Option<String>) -> anyhow::Result<(String, String)> {
    let admin = config.admin.as_ref();
    let url = admin_url
        .or_else(|| admin.map(|a| local_url(a.listen)))
        .context("no admin URL: pass --admin-url or configure [admin] in the config file")?;
    let token = token
        .or_else(|| admin.map(|a| a.token.expose_secret().to_owned()))
        .context("no admin token: pass --token, set SIO_PUSH_ADMIN_TOKEN or configure [admin] token")?;
    Ok((url, token))
}

/// Fetches `/api/status` and renders it as a table.
pub async fn status(config: &Config, admin_url: Option<String>, token: Option<String>) -> anyhow::Result<String> {
    let response = admin_get(&client()?, config, admin_url, token, "/api/status").await?;
    Ok(render(&response.json::<Status>().await.context("the admin API answered something unexpected")?))
}

/// `GET` of an admin API `path` (admin URL and token as given, else from the configuration):
/// the response, once its status says it succeeded.
pub async fn admin_get(
    client: &reqwest::Client,
    config: &Config,
    admin_url: Option<String>,
    token: Option<String>,
    path: &str,
) -> anyhow::Result<reqwest::Response> {
    let (url, token) = admin_access(config, admin_url, token)?;
    let response = client
        .get(format!("{}{path}", url.trim_end_matches('/')))
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| format!("cannot reach the admin API at {url}"))?;
    if !response.status().is_success() {
        bail!("admin API answered {}: {}", response.status(), response.text().await.unwrap_or_default());
    }
    Ok(response)
}

/// The status as a plain-text table.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:>9} {:>8} {:>8} {:>10} {:>10} {:>12}",
        "SITE", "MODE", "SOCKETS", "DEVICES", "CONNECTED", "QUEUED", "QUEUED BYTES"
    );
    for s in &status.sites {
        let mode = if s.reliable { "reliable" } else { "broadcast" };
        let _ = writeln!(
            out,
            "{:<20} {:>9} {:>8} {:>8} {:>10} {:>10} {:>12}",
            s.name, mode, s.sockets, s.devices, s.connected_devices, s.queued_messages, s.queued_bytes
        );
    }
    let t = &status.totals;
    let _ = writeln!(
        out,
        "\nsio-push {}: {} accepted, {} stored, {} delivered, {} acked since start",
        status.version, t.accepted, t.stored, t.delivered, t.acked
    );
    if let Some(node) = &status.node {
        let _ = writeln!(
            out,
            "node {node} of several on Redis: DEVICES, CONNECTED and QUEUED are the service's, SOCKETS and the counts since start this node's"
        );
    }
    out
}

/// What `sio-push send` posts.
#[derive(Debug)]
pub struct SendRequest {
    /// The site.
    pub site: String,
    /// Rooms to deliver to.
    pub rooms: Vec<String>,
    /// The event name.
    pub event: String,
    /// The arguments, as a JSON array or a single JSON value.
    pub args: Option<serde_json::Value>,
    /// `resync=true`.
    pub resync: bool,
}

/// Posts a message; returns the service's answer, or fails on anything but `200`.
pub async fn send(
    config: &Config,
    url: Option<String>,
    api_key: Option<String>,
    request: &SendRequest,
) -> anyhow::Result<String> {
    let url = url.unwrap_or_else(|| url_for(config.server.listen, config.server.tls.is_some()));
    let api_key = api_key
        .or_else(|| config.sites.get(&request.site).map(|s| s.api_key.expose_secret().to_owned()))
        .with_context(|| format!("no API key: pass --api-key or configure [sites.{}]", request.site))?;
    let mut body = serde_json::json!({ "rooms": request.rooms, "event": request.event });
    if let Some(args) = &request.args {
        body["args"] = args.clone();
    }
    let response = client()?
        .post(format!("{}/send", url.trim_end_matches('/')))
        .query(&[("site", request.site.as_str()), ("resync", if request.resync { "true" } else { "false" })])
        .header("X-Api-Key", api_key)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if status != reqwest::StatusCode::OK {
        bail!("{} {}", status.as_u16(), text);
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_listen_addresses_are_reached_on_loopback() {
        assert_eq!(local_url("0.0.0.0:1337".parse().unwrap()), "http://127.0.0.1:1337");
        assert_eq!(local_url("[::]:1337".parse().unwrap()), "http://[::1]:1337");
        assert_eq!(local_url("10.1.2.3:80".parse().unwrap()), "http://10.1.2.3:80");
    }
}
