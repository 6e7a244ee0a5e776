//! `POST /send` bodies: the first byte picks the content type, the rest is the body. Whatever
//! the input, parsing returns a message or an error; a parsed message must serialize to its
//! stored `[event, ...args]` form, which must be valid JSON starting with the event.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sio_push::http::publish::{parse_message, Limits};

fuzz_target!(|data: &[u8]| {
    let Some((kind, body)) = data.split_first() else { return };
    let content_type = match kind % 3 {
        0 => "application/json",
        1 => "application/x-www-form-urlencoded",
        _ => "application/json; charset=utf-8",
    };
    let limits = Limits { max_rooms: 1000, max_name_bytes: 1024 };
    if let Ok(msg) = parse_message(content_type, body, kind & 0x80 != 0, &limits) {
        assert!(!msg.event.is_empty() && msg.event.len() <= limits.max_name_bytes);
        assert!(!sio_push::names::RESERVED_EVENTS.contains(&msg.event.as_str()));
        assert!(msg.rooms.iter().all(|r| !r.is_empty() && r.len() <= limits.max_name_bytes));
        let entry: Vec<serde_json::Value> = serde_json::from_str(&msg.entry()).expect("entries are JSON arrays");
        assert_eq!(entry[0], serde_json::Value::String(msg.event.clone()));
        assert_eq!(entry.len(), msg.args.len() + 1);
    }
});
