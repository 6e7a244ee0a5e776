//! Configuration files: any input is a valid configuration or an error, never a panic, and a
//! valid one prints (as `check-config` does) without its API keys.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sio_push::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(config) = Config::from_toml(text) {
        let printed = config.to_string();
        for site in config.sites.values() {
            let key = site.api_key.expose_secret();
            if key.len() >= 8 {
                assert!(!printed.contains(key), "an API key was printed");
            }
        }
    }
});
