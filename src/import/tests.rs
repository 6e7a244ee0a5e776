use std::time::Duration;

use super::*;
use crate::config::Config;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/node-service").join(name)
}

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn run(pairs: &[(&str, &str)]) -> Imported {
    import(Some(&fixture("config.yml")), Some(&fixture("sites.yml")), &env(pairs), Path::new("/var/lib/sio-push"))
        .unwrap()
}

#[test]
fn the_old_yaml_becomes_a_config_serve_reads() {
    let imported = run(&[]);
    let config = Config::from_toml(&imported.toml).unwrap();
    assert_eq!(config.server.listen.to_string(), "0.0.0.0:80");
    assert_eq!(config.server.device_ttl, Duration::from_secs(7200));
    assert_eq!(config.server.ping_timeout, Duration::from_millis(60_000));
    assert_eq!(config.server.data_dir, PathBuf::from("/var/lib/sio-push"));
    let goodcity = &config.sites["goodcity"];
    assert_eq!(goodcity.auth_url.as_str(), "https://api.goodcity.example/api/v1/auth/current_user_rooms");
    assert!(goodcity.api_key.matches("54321"), "numeric YAML keys become text");
    assert_eq!(goodcity.user_room_prefix.as_deref(), Some("user_"));
    assert_eq!(goodcity.update_user_url.as_deref(), Some("https://api.goodcity.example/api/v1/users/:id"));
    assert_eq!(goodcity.public_channel.as_deref(), Some("browse"));
    let stockit = &config.sites["stockit"];
    assert_eq!(stockit.auth_scheme, "Token");
    assert!(!stockit.reliable());
    for dropped in ["redis", "flakeid", "servers", "stockit.logLevel"] {
        assert!(imported.notes.iter().any(|n| n.starts_with(dropped)), "{dropped} in {:?}", imported.notes);
    }
    assert!(!imported.toml.contains("secret@redis"), "the Redis URL (with its password) is not carried over");
}

#[test]
fn node_env_picks_the_section_and_the_old_env_vars_override() {
    let imported =
        run(&[("NODE_ENV", "staging"), ("PORT", "8080"), ("SITE_NAME", "goodcity"), ("API_KEY", "from-env")]);
    let config = Config::from_toml(&imported.toml).unwrap();
    assert_eq!(config.server.listen.port(), 8080);
    assert_eq!(config.server.device_ttl, Duration::from_secs(60));
    assert_eq!(config.server.ping_interval, Duration::from_millis(10_000));
    assert!(config.sites["goodcity"].api_key.matches("from-env"));
}

#[test]
fn env_alone_is_enough() {
    let vars = [
        ("SITE_NAME", "shop"),
        ("AUTH_URL", "http://127.0.0.1:3000/auth"),
        ("API_KEY", "k"),
        ("REDIS_URL", "redis://x"),
    ];
    let imported = import(None, None, &env(&vars), Path::new("/srv/data")).unwrap();
    let config = Config::from_toml(&imported.toml).unwrap();
    assert!(config.sites["shop"].api_key.matches("k"));
    assert!(imported.notes.iter().any(|n| n.contains("REDIS_URL")));
}

#[test]
fn bad_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let no_section = write("c1.yml", "development:\n  port: 1\n");
    let err = import(Some(&no_section), None, &env(&[]), Path::new("d")).unwrap_err().to_string();
    assert!(err.contains("production"), "{err}");
    let bad_port = write("c2.yml", "production:\n  port: eighty\n");
    let err = import(Some(&bad_port), None, &env(&[]), Path::new("d")).unwrap_err().to_string();
    assert!(err.contains("port"), "{err}");
    let bad_url = write("s1.yml", "shop:\n  authUrl: nowhere\n  apiKey: k\n");
    let err = import(None, Some(&bad_url), &env(&[]), Path::new("d")).unwrap_err().to_string();
    assert!(err.contains("sites.shop.auth_url"), "{err}");
    let not_yaml = write("s2.yml", "shop: [\n");
    assert!(import(None, Some(&not_yaml), &env(&[]), Path::new("d")).is_err());
    let missing = import(None, Some(&dir.path().join("nope.yml")), &env(&[]), Path::new("d")).unwrap_err();
    assert!(missing.to_string().contains("nope.yml"));
}
