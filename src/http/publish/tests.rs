use serde_json::json;

use super::*;

const JSON: &str = "application/json";
const FORM: &str = "application/x-www-form-urlencoded";

const LIMITS: Limits = Limits { max_rooms: 1000, max_name_bytes: 64 };

fn parse(content_type: &str, body: &str) -> Result<Message, String> {
    parse_message(content_type, body.as_bytes(), false, &LIMITS).map_err(|e| e.to_string())
}

#[test]
fn json_bodies_keep_args_as_given() {
    let msg =
        parse(JSON, r#"{"rooms":["user_1","staff"],"event":"update_store","args":["user",{"id":1,"b":2,"a":3}]}"#)
            .unwrap();
    assert_eq!(msg.rooms, ["user_1", "staff"]);
    assert_eq!(msg.event, "update_store");
    assert_eq!(msg.entry(), r#"["update_store","user",{"id":1,"b":2,"a":3}]"#);
}

#[test]
fn args_shapes_follow_the_contract() {
    assert_eq!(parse(JSON, r#"{"rooms":"user_1","event":"e"}"#).unwrap().args, [Value::Null]);
    assert_eq!(parse(JSON, r#"{"rooms":"user_1","event":"e","args":{"a":1}}"#).unwrap().args, [json!({"a":1})]);
    assert_eq!(parse(JSON, r#"{"rooms":"user_1","event":"e","args":"x"}"#).unwrap().args, [json!("x")]);
    assert_eq!(parse(JSON, r#"{"rooms":"user_1","event":"e","args":null}"#).unwrap().args, [Value::Null]);
    assert!(parse(JSON, r#"{"rooms":"user_1","event":"e","args":[]}"#).unwrap().args.is_empty());
    assert_eq!(parse(JSON, r#"{"rooms":"one","event":"e"}"#).unwrap().rooms, ["one"]);
}

#[test]
fn form_bodies_use_bracket_syntax() {
    let msg =
        parse(FORM, "rooms[]=user_1&rooms[]=staff&event=update&args[0][id]=1&args[0][tags][]=x&args[1]=two").unwrap();
    assert_eq!(msg.rooms, ["user_1", "staff"]);
    assert_eq!(msg.event, "update");
    assert_eq!(msg.args, [json!({"id":"1","tags":["x"]}), json!("two")]);
    let msg = parse(FORM, "rooms=user_1&event=e&args=hello").unwrap();
    assert_eq!((msg.rooms, msg.args), (vec!["user_1".to_string()], vec![json!("hello")]));
    let msg = parse(FORM, "rooms=a&rooms=b&event=e").unwrap();
    assert_eq!((msg.rooms, msg.args), (vec!["a".to_string(), "b".to_string()], vec![Value::Null]));
    let msg = parse(FORM, "rooms%5B%5D=user_1&event=e&args%5B1%5D=b&args%5B0%5D=a&args%5B10%5D=c").unwrap();
    assert_eq!(msg.args, [json!("a"), json!("b"), json!("c")]);
    assert_eq!(parse(FORM, "rooms[]=u&event=e&args[x]=1").unwrap().args, [json!({"x":"1"})]);
}

#[test]
fn bad_bodies_are_named() {
    let cases = [
        (JSON, "{not json", "Malformed JSON"),
        (JSON, "[1,2]", "must be an object"),
        (JSON, r#"{"rooms":"u"}"#, "Missing or empty 'event'"),
        (JSON, r#"{"rooms":"u","event":""}"#, "Missing or empty 'event'"),
        (JSON, r#"{"rooms":"u","event":5}"#, "'event' must be a string"),
        (JSON, r#"{"event":"e"}"#, "Missing 'rooms'"),
        (JSON, r#"{"rooms":5,"event":"e"}"#, "'rooms' must be"),
        (JSON, r#"{"rooms":["a",1],"event":"e"}"#, "'rooms' must be"),
        (JSON, r#"{"rooms":["a",""],"event":"e"}"#, "must not be empty"),
        (FORM, "rooms=a&rooms[x]=b&event=e", "both as a value and as a nested object"),
        ("text/plain", "hi", "Unsupported Content-Type \"text/plain\""),
        ("", "hi", "Unsupported Content-Type"),
    ];
    for (content_type, body, needle) in cases {
        let err = parse(content_type, body).unwrap_err();
        assert!(err.contains(needle), "{body:?} gave {err:?}");
    }
    let rooms: Vec<String> = (0..3).map(|i| format!("\"r{i}\"")).collect();
    let body = format!(r#"{{"rooms":[{}],"event":"e"}}"#, rooms.join(","));
    let err = parse_message(JSON, body.as_bytes(), false, &Limits { max_rooms: 2, ..LIMITS }).unwrap_err().to_string();
    assert!(err.contains("Too many rooms: 3"), "{err}");
    let deep = format!("rooms=a&event=e&args{}=1", "[a]".repeat(21));
    assert!(parse(FORM, &deep).unwrap_err().contains("deeper"));
}

#[test]
fn names_over_the_limit_and_reserved_events_are_refused_by_name() {
    let long = "r".repeat(65);
    let cases = [
        (
            format!(r#"{{"rooms":["user_1","{long}"],"event":"e"}}"#),
            "A room name in 'rooms' of 65 bytes is longer than server.max_name_bytes (64).",
        ),
        (
            format!(r#"{{"rooms":"user_1","event":"{long}"}}"#),
            "'event' of 65 bytes is longer than server.max_name_bytes (64).",
        ),
    ];
    for (body, want) in cases {
        assert_eq!(parse(JSON, &body).unwrap_err(), want);
    }
    assert!(parse(JSON, &format!(r#"{{"rooms":"{}","event":"e"}}"#, "r".repeat(64))).is_ok(), "at the limit");
    for event in crate::names::RESERVED_EVENTS {
        let err = parse(JSON, &format!(r#"{{"rooms":"user_1","event":"{event}"}}"#)).unwrap_err();
        assert_eq!(err, format!("'event' \"{event}\" is reserved: socket.io clients handle it themselves."));
    }
    assert!(parse(JSON, r#"{"rooms":"user_1","event":"message"}"#).is_ok(), "an ordinary event");
}

#[test]
fn errors_never_echo_unbounded_or_multi_line_input() {
    let key = format!("x\nINFO forged{}[a]", "k".repeat(30_000));
    let body = format!("rooms=u&event=e&{key}=1&{}=2", key.replace("[a]", ""));
    let err = parse(FORM, &body).unwrap_err();
    assert!(err.len() < 400, "{} bytes", err.len());
    assert!(!err.contains('\n') && err.contains("\\n") && err.contains("more bytes]"), "{err}");
    let err = parse_bool("resync", Some(&"y".repeat(5000))).unwrap_err().to_string();
    assert!(err.len() < 400, "{err}");
}

#[test]
fn content_type_parameters_are_ignored() {
    assert!(parse("application/json; charset=utf-8", r#"{"rooms":"u","event":"e"}"#).is_ok());
    assert!(parse("Application/X-WWW-Form-Urlencoded", "rooms=u&event=e").is_ok());
}

#[test]
fn resync_is_a_real_boolean() {
    for (text, want) in
        [(None, false), (Some("true"), true), (Some("1"), true), (Some("false"), false), (Some("0"), false)]
    {
        assert_eq!(parse_bool("resync", text).unwrap(), want);
    }
    assert!(parse_bool("resync", Some("yes")).is_err());
}

#[test]
fn idempotency_keys_are_checked_and_fingerprints_tell_requests_apart() {
    let mut headers = HeaderMap::new();
    assert_eq!(idempotency_key(&headers).unwrap(), None);
    headers.insert("idempotency-key", "order-42/retry".parse().unwrap());
    assert_eq!(idempotency_key(&headers).unwrap().as_deref(), Some("order-42/retry"));
    headers.insert("idempotency-key", "has space".parse().unwrap());
    assert!(idempotency_key(&headers).is_err());
    headers.insert("idempotency-key", "x".repeat(256).parse().unwrap());
    assert!(idempotency_key(&headers).is_err());
    let a = fingerprint(&[b"application/json", b"{}", &[0]]);
    assert_eq!(a, fingerprint(&[b"application/json", b"{}", &[0]]));
    assert_ne!(a, fingerprint(&[b"application/json", b"{}", &[1]]));
    assert_ne!(fingerprint(&[b"ab", b"c"]), fingerprint(&[b"a", b"bc"]));
}

#[test]
fn the_api_key_header_stands_in_for_the_query() {
    let mut headers = HeaderMap::new();
    let p = Params::parse("site=s&apiKey=q", &headers);
    assert_eq!((p.site.as_deref(), p.api_key.as_deref()), (Some("s"), Some("q")));
    headers.insert("x-api-key", "h".parse().unwrap());
    assert_eq!(Params::parse("site=s", &headers).api_key.as_deref(), Some("h"));
    assert_eq!(Params::parse("site=&apiKey=", &HeaderMap::new()).site, None);
}

/// The fuzzer's inputs: the seed corpus and every crash input kept after its fix. The first byte
/// picks the content type, as in `fuzz/fuzz_targets/send_body.rs`.
#[test]
fn fuzz_corpus_and_regressions_parse_without_panicking() {
    let mut replayed = 0;
    for dir in ["fuzz/corpus/send_body", "fuzz/regressions/send_body"] {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        for entry in std::fs::read_dir(dir).unwrap() {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            let Some((kind, body)) = data.split_first() else { continue };
            let content_type = [JSON, FORM, "application/json; charset=utf-8"][usize::from(kind % 3)];
            let _ = parse_message(content_type, body, kind & 0x80 != 0, &LIMITS);
            replayed += 1;
        }
    }
    assert!(replayed >= 4, "the seed corpus is there");
}
