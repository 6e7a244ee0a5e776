//! The built-in demo (`[server] demo = true`, set only in `config.example.toml`): a page at
//! `/demo` that connects as a socket.io client and shows what arrives, and an auth endpoint at
//! `/demo/auth` that lets anyone in. The token names the user: token `alice` gets the rooms
//! `user_alice` and `demo`. Never enable it in production.

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::{Json, Router};

use super::AppState;

/// `/demo` and `/demo/auth`.
pub fn routes() -> Router<AppState> {
    Router::new().route("/demo", get(page)).route("/demo/auth", get(auth))
}

async fn page() -> Html<&'static str> {
    Html(include_str!("demo.html"))
}

async fn auth(headers: HeaderMap) -> impl IntoResponse {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .map(|(_, token)| token)
        .filter(|t| !t.is_empty() && t.len() <= 64 && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    match token {
        Some(name) => Ok(Json(vec![format!("user_{name}"), "demo".to_string()])),
        None => Err(StatusCode::UNAUTHORIZED),
    }
}
