//! `docs/config.md` cannot drift from the configuration type: its example parses (no
//! unknown or misspelled key), and every key the type has appears in it.

use petrel_snapshotter::config::{Config, DaemonSettings, LogLevel, PrefetchSetting, RegistryHost};

fn documented() -> String {
    let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/config.md")).unwrap();
    let start = page.find("```toml\n").expect("a toml block") + "```toml\n".len();
    let end = start + page[start..].find("```").expect("its end");
    page[start..end].to_string()
}

/// Every key path of `value` (`registry.mirrors`, `daemon.retries`, …).
fn key_paths(value: &toml::Value, prefix: &str, out: &mut Vec<String>) {
    match value {
        toml::Value::Table(table) => {
            for (key, inner) in table {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                out.push(path.clone());
                key_paths(inner, &path, out);
            }
        }
        toml::Value::Array(items) => {
            for item in items {
                key_paths(item, prefix, out);
            }
        }
        _ => {}
    }
}

#[test]
fn the_reference_page_lists_every_key_and_parses() {
    let text = documented();
    let parsed: Config = toml::from_str(&text).unwrap_or_else(|e| panic!("docs/config.md: {e}"));
    assert_eq!(parsed.registry.len(), 1);
    // A configuration with every optional key set, as the type serializes it.
    let full = Config {
        cache_max_bytes: Some(1),
        metrics_address: Some("a".into()),
        registry: vec![RegistryHost {
            host: "h".into(),
            username: Some("u".into()),
            password: Some("p".into()),
            mirrors: vec!["m".into()],
            plain_http: true,
            ca_file: Some("c".into()),
        }],
        daemon: DaemonSettings {
            retries: Some(1),
            retry_seconds: Some(1.0),
            amplify_bytes: Some(1),
            fuse_threads: Some(1),
            fetch_threads: Some(1),
            prefetch: Some(PrefetchSetting::All),
            prefetch_request_bytes: Some(1),
            prefetch_parallel: Some(1),
            prefetch_bandwidth: Some(1),
            readahead_dir_bytes: Some(1),
            readahead_file_max_bytes: Some(1),
            profile_lookup: Some(true),
            record_first_start_seconds: Some(1.0),
            publish_profiles: Some(true),
            passthrough: Some(true),
            file_opens: Some(petrel_fuse_daemon::file_opens::FileOpens::Kernel),
            log_level: Some(LogLevel::Debug),
        },
        hosts_dir: Some("d".into()),
        ..Config::default()
    };
    let mut type_keys = Vec::new();
    key_paths(&toml::Value::try_from(&full).unwrap(), "", &mut type_keys);
    let mut doc_keys = Vec::new();
    key_paths(&toml::from_str::<toml::Value>(&text).unwrap(), "", &mut doc_keys);
    let missing: Vec<&String> = type_keys.iter().filter(|k| !doc_keys.contains(k)).collect();
    assert!(missing.is_empty(), "keys missing from docs/config.md: {missing:?}");
}
