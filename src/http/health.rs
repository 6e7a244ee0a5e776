//! `GET /healthcheck`: `200 ok` while the process serves.

/// Answers `ok`.
pub async fn healthcheck() -> &'static str {
    "ok"
}
