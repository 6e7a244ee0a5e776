//! Configuration files: any input is a valid configuration or an error, never a panic, and a
//! valid one prints (as `check-config` does) without its secrets.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sio_push::config::ApiKey;
use sio_push::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(mut config) = Config::from_toml(text) {
        // What is printed must not depend on the secrets: with every one replaced, the text is
        // the same. (Searching the text for a key found keys that are also a setting's name.)
        let printed = config.to_string();
        for site in config.sites.values_mut() {
            site.api_key = ApiKey::new("another-api-key");
        }
        if let Some(admin) = &mut config.admin {
            admin.token = ApiKey::new("another-admin-token");
        }
        assert_eq!(printed, config.to_string(), "a secret was printed");
    }
});
