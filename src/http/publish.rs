//! `POST /send?site=<site>&apiKey=<key>&resync=<bool>`: the website's way to push a message.
//!
//! The body is `{"rooms": [..] | "one", "event": "name", "args": [..]}` as JSON or as
//! form-urlencoded with qs bracket syntax (`rooms[]=a&args[0][id]=1`), as Express parsed it for
//! the old service. `args` that is not an array is one argument; absent `args` is one `null`, so
//! a client handler `function (data, ack)` still finds its ack second. `200 OK` means the
//! message is on disk.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, Request};
use serde_json::{Map, Value};

use super::AppState;
use crate::delivery::Message;
use crate::error::ApiError;
use crate::names;

/// Deepest bracket nesting a form key may have.
const MAX_FORM_DEPTH: usize = 20;

/// Handles `POST /send`, within `server.request_timeout_secs`.
pub async fn send(State(state): State<AppState>, request: Request<Body>) -> Result<&'static str, ApiError> {
    let limit = state.server.request_timeout;
    tokio::time::timeout(limit, accept(state, request)).await.map_err(|_| ApiError::Timeout { after: limit })?
}

async fn accept(state: AppState, request: Request<Body>) -> Result<&'static str, ApiError> {
    let (parts, body) = request.into_parts();
    let params = Params::parse(parts.uri.query().unwrap_or(""), &parts.headers);
    let (Some(site), Some(key)) = (params.site.as_deref(), params.api_key.as_deref()) else {
        return Err(ApiError::MissingSiteOrKey);
    };
    let site = match state.sites.get(site) {
        Some(s) if s.api_key.matches(key) => s,
        _ => return Err(ApiError::InvalidKey),
    };
    let started = std::time::Instant::now();
    state.limiter.check(&site, started).map_err(|retry_after| ApiError::RateLimited { retry_after })?;
    let max = state.server.max_body_bytes;
    // A declared length over the limit is refused before reading: read, it would only hold the
    // connection (and a request that never sends that much, until the timeout).
    let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max as u64) {
        return Err(ApiError::TooLarge { max });
    }
    let body = axum::body::to_bytes(body, max).await.map_err(|_| ApiError::TooLarge { max })?;
    let content_type = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let resync = parse_bool("resync", params.resync.as_deref())?;
    let limits = Limits { max_rooms: state.server.max_rooms_per_request, max_name_bytes: state.server.max_name_bytes };
    let msg = parse_message(content_type, &body, resync, &limits)?;
    let key = idempotency_key(&parts.headers)?
        .map(|key| (key, fingerprint(&[content_type.as_bytes(), &body, &[u8::from(resync)]])));
    state.delivery.send(&site, msg, key).await?;
    crate::metrics::accepted(&site.name, started.elapsed());
    Ok("OK")
}

/// The query parameters `/send` reads.
#[derive(Debug, Default)]
struct Params {
    site: Option<String>,
    api_key: Option<String>,
    resync: Option<String>,
}

impl Params {
    /// Reads the query; the `X-Api-Key` header stands in for `apiKey`.
    fn parse(query: &str, headers: &HeaderMap) -> Self {
        let mut p = Self::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let slot = match key.as_ref() {
                "site" => &mut p.site,
                "apiKey" => &mut p.api_key,
                "resync" => &mut p.resync,
                _ => continue,
            };
            *slot = Some(value.into_owned());
        }
        if let Some(key) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
            p.api_key = Some(key.to_owned());
        }
        p.site = p.site.filter(|s| !s.is_empty());
        p.api_key = p.api_key.filter(|s| !s.is_empty());
        p
    }
}

/// The `Idempotency-Key` header, if any: 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    match value.to_str() {
        Ok(key) if (1..=255).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic()) => {
            Ok(Some(key.to_owned()))
        }
        _ => Err(ApiError::BadRequest("Idempotency-Key must be 1 to 255 visible ASCII characters.".into())),
    }
}

/// FNV-1a over the parts: a stable fingerprint telling a retry from a different request.
fn fingerprint(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.iter().chain(&[0xff]) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// `true`/`1` on, `false`/`0`/absent off, anything else a 400.
fn parse_bool(name: &str, value: Option<&str>) -> Result<bool, ApiError> {
    match value.map(str::trim) {
        None | Some("") | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") => Ok(true),
        Some(other) => Err(ApiError::BadRequest(format!(
            "Query param '{name}' must be true, false, 1 or 0, not {}.",
            names::shown(other)
        ))),
    }
}

/// What a `/send` body may hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// `server.max_rooms_per_request`.
    pub max_rooms: usize,
    /// `server.max_name_bytes`: rooms and the event.
    pub max_name_bytes: usize,
}

/// Turns a `/send` body into a message, or says what is wrong with it.
pub fn parse_message(content_type: &str, body: &[u8], resync: bool, limits: &Limits) -> Result<Message, ApiError> {
    let mime = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let doc = match mime.as_str() {
        "application/json" => serde_json::from_slice::<Value>(body)
            .map_err(|e| ApiError::BadRequest(format!("Malformed JSON body: {e}.")))?,
        "application/x-www-form-urlencoded" => parse_form(body)?,
        "" => return Err(ApiError::UnsupportedMediaType("(none)".into())),
        other => return Err(ApiError::UnsupportedMediaType(names::shown(other))),
    };
    let Value::Object(mut doc) = doc else {
        return Err(ApiError::BadRequest("Body must be an object with 'rooms', 'event' and 'args'.".into()));
    };
    let event = match doc.remove("event") {
        Some(Value::String(e)) if !e.is_empty() => e,
        None | Some(Value::Null) | Some(Value::String(_)) => {
            return Err(ApiError::BadRequest("Missing or empty 'event'.".into()))
        }
        Some(_) => return Err(ApiError::BadRequest("'event' must be a string.".into())),
    };
    let rooms_type = || ApiError::BadRequest("'rooms' must be a room name or an array of room names.".into());
    let rooms = match doc.remove("rooms") {
        None | Some(Value::Null) => return Err(ApiError::BadRequest("Missing 'rooms'.".into())),
        Some(Value::String(room)) => vec![room],
        Some(Value::Array(list)) => list
            .into_iter()
            .map(|r| match r {
                Value::String(r) => Ok(r),
                _ => Err(rooms_type()),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(rooms_type()),
    };
    if rooms.iter().any(String::is_empty) {
        return Err(ApiError::BadRequest("Room names in 'rooms' must not be empty.".into()));
    }
    if rooms.len() > limits.max_rooms {
        return Err(ApiError::BadRequest(format!(
            "Too many rooms: {} (server.max_rooms_per_request is {}).",
            rooms.len(),
            limits.max_rooms
        )));
    }
    names::check_length("'event'", &event, limits.max_name_bytes).map_err(ApiError::BadRequest)?;
    if names::RESERVED_EVENTS.contains(&event.as_str()) {
        return Err(ApiError::BadRequest(format!(
            "'event' {} is reserved: socket.io clients handle it themselves.",
            names::shown(&event)
        )));
    }
    for room in &rooms {
        names::check_length("A room name in 'rooms'", room, limits.max_name_bytes).map_err(ApiError::BadRequest)?;
    }
    let args = match doc.remove("args") {
        None => vec![Value::Null],
        Some(Value::Array(args)) => args,
        Some(one) => vec![one],
    };
    Ok(Message { rooms, event, args, resync })
}

/// Parses a form body the way the `qs` package does for Express: `a[]=x` appends, `a[0]=x` and
/// `a[k]=x` nest, repeated plain keys collect into an array; objects whose keys are all indices
/// become arrays in index order. Values stay strings.
fn parse_form(body: &[u8]) -> Result<Value, ApiError> {
    let mut root = Map::new();
    for (key, value) in form_urlencoded::parse(body) {
        let (head, path) = split_key(&key);
        if path.len() > MAX_FORM_DEPTH {
            let key = names::shown(&key);
            return Err(ApiError::BadRequest(format!("Form key {key} nests deeper than {MAX_FORM_DEPTH} levels.")));
        }
        insert(&mut root, head, &path, Value::String(value.into_owned()))?;
    }
    Ok(arrays_from_indices(Value::Object(root)))
}

/// `a[b][]` -> (`a`, [`b`, ``]). A key whose brackets do not close is taken whole.
fn split_key(key: &str) -> (&str, Vec<&str>) {
    let Some(open) = key.find('[').filter(|&i| i > 0) else {
        return (key, Vec::new());
    };
    let mut path = Vec::new();
    let mut rest = &key[open..];
    while let Some(inner) = rest.strip_prefix('[') {
        let Some(close) = inner.find(']') else {
            return (key, Vec::new());
        };
        path.push(&inner[..close]);
        rest = &inner[close + 1..];
    }
    if rest.is_empty() {
        (&key[..open], path)
    } else {
        (key, Vec::new())
    }
}

fn insert(map: &mut Map<String, Value>, key: &str, path: &[&str], value: Value) -> Result<(), ApiError> {
    let Some((next, rest)) = path.split_first() else {
        // A repeated plain key collects into an array, as qs does.
        match map.get_mut(key) {
            None => {
                map.insert(key.to_owned(), value);
            }
            Some(Value::Array(list)) => list.push(value),
            Some(Value::Object(_)) => return Err(conflict(key)),
            Some(existing) => {
                let first = existing.take();
                *existing = Value::Array(vec![first, value]);
            }
        }
        return Ok(());
    };
    let child = map.entry(key.to_owned()).or_insert_with(|| Value::Object(Map::new()));
    let child = match child {
        Value::Object(child) => child,
        // `a=x&a[b]=y`: qs would merge; a body like that is a mistake worth naming.
        _ => return Err(conflict(key)),
    };
    let next_key = if next.is_empty() { child.len().to_string() } else { (*next).to_owned() };
    insert(child, &next_key, rest, value)
}

fn conflict(key: &str) -> ApiError {
    ApiError::BadRequest(format!("Form key {} is given both as a value and as a nested object.", names::shown(key)))
}

fn arrays_from_indices(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let all_indices =
                !map.is_empty() && map.keys().all(|k| k.parse::<usize>().is_ok_and(|i| i.to_string() == *k));
            if all_indices {
                let mut items: Vec<(usize, Value)> =
                    map.into_iter().map(|(k, v)| (k.parse().expect("checked above"), arrays_from_indices(v))).collect();
                items.sort_by_key(|(i, _)| *i);
                Value::Array(items.into_iter().map(|(_, v)| v).collect())
            } else {
                Value::Object(map.into_iter().map(|(k, v)| (k, arrays_from_indices(v))).collect())
            }
        }
        Value::Array(list) => Value::Array(list.into_iter().map(arrays_from_indices).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests;
