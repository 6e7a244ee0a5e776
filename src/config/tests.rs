use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn from_env(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::load_with_env(&Sources::default(), env(pairs))
}

fn file(text: &str) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), text).unwrap();
    f
}

const OLD_ENV: &[(&str, &str)] = &[
    ("REDIS_URL", "redis://localhost:6379"),
    ("DEVICE_TTL", "120"),
    ("PORT", "8080"),
    ("SITE_NAME", "goodcity"),
    ("AUTH_URL", "http://127.0.0.1:3000/api/v1/auth/current_user_rooms"),
    ("AUTH_SCHEME", "Token"),
    ("API_KEY", "k3y"),
    ("USER_ROOM_PREFIX", "user_"),
    ("UPDATE_USER_URL", "http://127.0.0.1:3000/api/v1/users/:id"),
    ("PUBLIC_CHANNEL", "browse"),
];

#[test]
fn the_old_services_environment_alone_configures_one_site() {
    let config = from_env(OLD_ENV).unwrap();
    assert_eq!(config.server.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(config.server.device_ttl, Duration::from_secs(120));
    let site = &config.sites["goodcity"];
    assert_eq!(site.auth_url.as_str(), "http://127.0.0.1:3000/api/v1/auth/current_user_rooms");
    assert_eq!(site.auth_scheme, "Token");
    assert!(site.api_key.matches("k3y") && !site.api_key.matches("k3") && !site.api_key.matches("k3y!"));
    assert_eq!(site.user_room_prefix.as_deref(), Some("user_"));
    assert_eq!(site.public_channel.as_deref(), Some("browse"));
    assert!(site.reliable() && site.is_user_room("user_3_admin") && site.is_user_room("browse"));
    assert!(!site.is_user_room("staff"));
    assert_eq!(config.warnings.len(), 1, "{:?}", config.warnings);
    assert!(config.warnings[0].contains("REDIS_URL"));
}

#[test]
fn defaults_match_the_old_service() {
    let config = from_env(&[]).unwrap();
    assert_eq!(config.server.listen.port(), 1337);
    assert_eq!(config.server.device_ttl, Duration::from_secs(3600));
    assert_eq!(config.server.data_dir, PathBuf::from("./data"));
    assert!(config.sites.is_empty());
    assert!(config.warnings.iter().any(|w| w.contains("no site")));
}

#[test]
fn environment_overrides_the_file_and_flags_override_both() {
    let f = file(
        r#"
        [server]
        listen = "127.0.0.1:9000"
        device_ttl_secs = 10
        [sites.goodcity]
        auth_url = "http://example.test/auth"
        api_key = "from-file"
        [sites.other]
        auth_url = "http://example.test/other"
        api_key = "other"
        "#,
    );
    let sources = Sources { file: Some(f.path().into()), data_dir: Some("/tmp/x".into()), ..Sources::default() };
    let config = Config::load_with_env(
        &sources,
        env(&[
            ("PORT", "9100"),
            ("SITE_NAME", "goodcity"),
            ("API_KEY", "from-env"),
            ("SIO_PUSH_DATA_DIR", "/tmp/y"),
            ("SIO_PUSH_SERVER__MAX_BODY_BYTES", "2048"),
        ]),
    )
    .unwrap();
    assert_eq!(config.server.listen.to_string(), "127.0.0.1:9100");
    assert_eq!(config.server.device_ttl, Duration::from_secs(10));
    assert_eq!(config.server.data_dir, PathBuf::from("/tmp/x"));
    assert_eq!(config.server.max_body_bytes, 2048);
    assert!(config.sites["goodcity"].api_key.matches("from-env"));
    assert_eq!(config.sites["goodcity"].auth_url.as_str(), "http://example.test/auth");
    assert!(config.sites["other"].api_key.matches("other"));
}

#[test]
fn nested_environment_keys_take_numbers_booleans_arrays_and_text() {
    let config = from_env(&[
        ("SITE_NAME", "shop"),
        ("AUTH_URL", "http://a.test"),
        ("API_KEY", "k"),
        ("SIO_PUSH_SITES__SHOP__ALLOWED_ORIGINS", r#"["https://shop.example"]"#),
        ("SIO_PUSH_SITES__SHOP__RATE_LIMIT_PER_SEC", "5"),
        ("SIO_PUSH_SERVER__DEMO", "true"),
        ("SIO_PUSH_SITES__SHOP__AUTH_SCHEME", "Token"),
    ])
    .unwrap();
    let shop = &config.sites["shop"];
    assert_eq!(shop.allowed_origins, ["https://shop.example"]);
    assert_eq!((shop.rate_limit_per_sec, shop.auth_scheme.as_str()), (5, "Token"));
    assert!(config.server.demo);
}

#[test]
fn sio_push_data_dir_sets_the_data_dir() {
    let config = from_env(&[("SIO_PUSH_DATA_DIR", "/var/lib/x")]).unwrap();
    assert_eq!(config.server.data_dir, PathBuf::from("/var/lib/x"));
}

#[test]
fn unknown_keys_are_errors_that_name_the_key() {
    let err = Config::from_toml("[server]\nlisten_addr = \"x\"\n").unwrap_err().to_string();
    assert!(err.contains("listen_addr"), "{err}");
    let err = Config::from_toml("[sites.a]\nauth_url = \"http://a.test\"\napi_key = \"k\"\nauthUrl = \"x\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("authUrl"), "{err}");
    let err = from_env(&[("SIO_PUSH_SERVER__NOPE", "1")]).unwrap_err().to_string();
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn bad_values_name_the_key_the_value_and_what_is_accepted() {
    let cases = [
        ("[server]\nlisten = \"nowhere\"", "server.listen"),
        ("[server]\nmax_body_bytes = 0", "server.max_body_bytes"),
        ("[server]\ndevice_ttl_secs = -1", "device_ttl_secs"),
        ("[server]\nlog_format = \"xml\"", "xml"),
        ("[sites.a]\nauth_url = \"ftp://a\"\napi_key = \"k\"", "sites.a.auth_url"),
        ("[sites.a]\nauth_url = \"http://a.test\"\napi_key = \"\"", "sites.a.api_key"),
        ("[sites.\"a/b\"]\nauth_url = \"http://a.test\"\napi_key = \"k\"", "sites.a/b"),
        ("[sites.a]\napi_key = \"k\"", "auth_url"),
        ("[sites.a]\nauth_url = \"http://a.test\"\napi_key = \"   \"", "sites.a.api_key"),
        ("[server]\ndata_dir = \"\"", "server.data_dir"),
        ("[server]\nmax_name_bytes = 0", "server.max_name_bytes"),
        ("[server]\nmax_name_bytes = 65536", "server.max_name_bytes"),
    ];
    for (text, needle) in cases {
        let err = Config::from_toml(text).unwrap_err().to_string();
        assert!(err.contains(needle), "{text:?} gave {err:?}");
    }
    for (var, value) in [("PORT", "eighty"), ("DEVICE_TTL", "-5"), ("DEVICE_TTL", "1h")] {
        let err = from_env(&[(var, value)]).unwrap_err().to_string();
        assert!(err.contains(var) && err.contains(value), "{err}");
    }
}

/// Settings that would misplace data or leave a site silently unconfigured are startup errors.
#[test]
fn blank_settings_of_the_old_environment_are_errors_that_name_them() {
    let with = |var: &str, value: &str| {
        let mut env: Vec<(&str, &str)> = OLD_ENV.iter().filter(|(k, _)| *k != var).copied().collect();
        env.push((var, value));
        from_env(&env).map(|_| ()).unwrap_err().to_string()
    };
    assert!(with("SITE_NAME", "").contains("SITE_NAME"));
    assert!(with("SITE_NAME", "  ").contains("SITE_NAME"));
    assert!(with("API_KEY", "   ").contains("sites.goodcity.api_key"));
    assert!(with("SIO_PUSH_DATA_DIR", "").contains("server.data_dir"));
    // In memory there is nothing to misplace.
    let mut env = OLD_ENV.to_vec();
    env.extend([("SIO_PUSH_DATA_DIR", ""), ("SIO_PUSH_SERVER__EPHEMERAL", "true")]);
    assert!(from_env(&env).is_ok());
}

#[test]
fn site_limits_and_origins_have_defaults_and_are_checked() {
    let site = "[sites.a]\nauth_url = \"http://a.test\"\napi_key = \"k\"\n";
    let config = Config::from_toml(site).unwrap();
    let a = &config.sites["a"];
    // Off unless configured: the old service had no rate limit (PROTOCOL.md, Part B).
    assert_eq!(a.rate_limit_per_sec, 0);
    assert!(a.allowed_origins.is_empty());
    let limited = |extra: &str| Config::from_toml(&format!("{site}{extra}")).unwrap().sites["a"].clone();
    let a = limited("rate_limit_per_sec = 100\n");
    assert_eq!((a.rate_limit_per_sec, a.rate_limit_burst), (100, 200));
    let a = limited("rate_limit_per_sec = 100\nrate_limit_burst = 5\n");
    assert_eq!((a.rate_limit_per_sec, a.rate_limit_burst), (100, 5));
    let config = Config::from_toml(&format!(
        "{site}allowed_origins = [\"https://shop.example\", \"http://localhost:3000/\"]\nrate_limit_per_sec = 0\n"
    ))
    .unwrap();
    assert_eq!(config.sites["a"].allowed_origins, ["https://shop.example", "http://localhost:3000"]);
    assert_eq!(config.sites["a"].rate_limit_per_sec, 0);
    for bad in ["shop.example", "https://shop.example/path", "ftp://x"] {
        let err = Config::from_toml(&format!("{site}allowed_origins = [\"{bad}\"]\n")).unwrap_err().to_string();
        assert!(err.contains("sites.a.allowed_origins") && err.contains(bad), "{err}");
    }
}

#[test]
fn empty_optional_settings_mean_unset() {
    let config =
        from_env(&[("SITE_NAME", "s"), ("AUTH_URL", "http://a.test"), ("API_KEY", "k"), ("USER_ROOM_PREFIX", "")])
            .unwrap();
    assert!(!config.sites["s"].reliable());
    assert_eq!(config.sites["s"].auth_scheme, "Bearer");
}

#[test]
fn site_variables_without_site_name_are_warned_about() {
    let config = from_env(&[("AUTH_URL", "http://a.test")]).unwrap();
    assert!(config.sites.is_empty());
    assert!(config.warnings.iter().any(|w| w.contains("AUTH_URL")));
}

#[test]
fn printed_settings_mask_secrets() {
    let config = from_env(OLD_ENV).unwrap();
    let printed = config.to_string();
    assert!(!printed.contains("k3y"), "{printed}");
    assert!(printed.contains("api_key = (set)"));
    assert!(!format!("{config:?}").contains("k3y"));
}

#[test]
fn the_example_config_is_valid() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml")).unwrap();
    let config = Config::from_toml(&text).unwrap();
    assert!(config.server.demo);
    assert!(config.sites.contains_key("demo"));
}

#[test]
fn the_admin_listener_is_off_unless_configured_and_needs_a_real_token() {
    assert!(Config::from_toml("").unwrap().admin.is_none());
    let config = Config::from_toml("[admin]\ntoken = \"0123456789abcdef\"\n").unwrap();
    let admin = config.admin.as_ref().unwrap();
    assert_eq!(admin.listen.to_string(), "127.0.0.1:1338");
    assert!(admin.token.matches("0123456789abcdef"));
    assert!(!config.to_string().contains("0123456789abcdef"));
    let err = Config::from_toml("[admin]\ntoken = \"short\"\n").unwrap_err().to_string();
    assert!(err.contains("admin.token") && !err.contains("short"), "{err}");
    assert!(Config::from_toml("[admin]\nlisten = \"x\"\ntoken = \"0123456789abcdef\"\n").is_err());
}

/// The fuzzer's inputs: the seed corpus and every crash input kept after its fix, with the
/// fuzz target's checks (`fuzz/fuzz_targets/config.rs`): no panic, and what a valid one prints
/// does not depend on its secrets.
#[test]
fn fuzz_corpus_and_regressions_load_without_panicking() {
    let mut replayed = 0;
    for dir in ["fuzz/corpus/config", "fuzz/regressions/config"] {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let Ok(text) = std::fs::read_to_string(&path) else { continue };
            replayed += 1;
            let Ok(mut config) = Config::from_toml(&text) else { continue };
            let printed = config.to_string();
            for site in config.sites.values_mut() {
                site.api_key = ApiKey::new("another-api-key");
            }
            if let Some(admin) = &mut config.admin {
                admin.token = ApiKey::new("another-admin-token");
            }
            assert_eq!(printed, config.to_string(), "{} printed a secret", path.display());
        }
    }
    assert!(replayed >= 3, "the seed corpus and the regressions are there");
}

#[test]
fn tls_needs_both_files_and_a_readable_pair() {
    let err = Config::from_toml("[server]\ntls_cert_path = \"/nonexistent/cert.pem\"\n").unwrap_err().to_string();
    assert!(err.contains("server.tls_key_path") && err.contains("go together"), "{err}");
    let err = Config::from_toml(
        "[server]\ntls_cert_path = \"/nonexistent/cert.pem\"\ntls_key_path = \"/nonexistent/key.pem\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("server.tls_cert_path") && err.contains("/nonexistent/cert.pem"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem");
    std::fs::write(&cert, "not a certificate").unwrap();
    let text = format!("[server]\ntls_cert_path = {:?}\ntls_key_path = {:?}\n", cert, cert);
    let err = Config::from_toml(&text).unwrap_err().to_string();
    assert!(err.contains("no certificate"), "{err}");
}

#[test]
fn the_store_is_sled_unless_redis_is_chosen_and_redis_settings_are_checked() {
    assert!(matches!(from_env(OLD_ENV).unwrap().store, StoreConfig::Sled), "REDIS_URL alone keeps sled");
    let warning = &from_env(OLD_ENV).unwrap().warnings[0];
    assert!(warning.contains("SIO_PUSH_STORE__BACKEND") && warning.contains("redis_url"), "{warning}");
    let redis =
        [("SIO_PUSH_STORE__BACKEND", "redis"), ("SIO_PUSH_STORE__REDIS_URL", "redis://:s3cret@10.0.0.5:6379/2")];
    let config = from_env(&redis).unwrap();
    let StoreConfig::Redis(r) = &config.store else { panic!("{:?}", config.store) };
    assert_eq!((r.urls.len(), r.cluster, r.key_prefix.as_str(), r.wait_replicas), (1, false, "sio-push", 0));
    let printed = config.to_string();
    assert!(printed.contains("backend = \"redis\"") && !printed.contains("s3cret"), "{printed}");
    assert!(!format!("{config:?}").contains("s3cret"));

    let err = |pairs: &[(&str, &str)]| from_env(pairs).unwrap_err().to_string();
    assert!(err(&[("SIO_PUSH_STORE__BACKEND", "redis")]).contains("store.redis_url"));
    assert!(err(&[("SIO_PUSH_STORE__BACKEND", "postgres")]).contains("store.backend"));
    let bad_url = err(&[redis[0], ("SIO_PUSH_STORE__REDIS_URL", "http://:s3cret@host/")]);
    assert!(bad_url.contains("store.redis_url") && !bad_url.contains("s3cret"), "{bad_url}");
    let two = [redis[0], ("SIO_PUSH_STORE__REDIS_URL", "redis://a:7000,redis://b:7001")];
    assert!(err(&two).contains("redis_cluster"));
    let cluster = from_env(&[two[0], two[1], ("SIO_PUSH_STORE__REDIS_CLUSTER", "true")]).unwrap();
    assert!(
        matches!(cluster.store, StoreConfig::Redis(RedisConfig { cluster: true, ref urls, .. }) if urls.len() == 2)
    );
    assert!(err(&[redis[0], redis[1], ("SIO_PUSH_STORE__KEY_PREFIX", "a{b}")]).contains("store.key_prefix"));
    assert!(err(&[redis[0], redis[1], ("SIO_PUSH_STORE__REDIS_TIMEOUT_MS", "60000")]).contains("request_timeout"));
}
