//! Tests of layering, profiles, secrets from files and the messages of refused settings.

use std::collections::BTreeSet;
use std::io::Write;

use super::*;

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

fn load_with(file: Option<&Path>, pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    load(&Sources {
        file: file.map(Path::to_owned),
        env: env(pairs),
        flags: Layer::default(),
    })
}

fn problems(err: ConfigError) -> Vec<String> {
    match err {
        ConfigError::Invalid(p) => p,
        other => panic!("expected invalid settings, got {other}"),
    }
}

#[test]
fn no_configuration_gives_the_embedded_default() {
    let config = load_with(None, &[]).unwrap();
    assert_eq!(config.profile, Profile::Dev);
    assert_eq!(config.bind.to_string(), "127.0.0.1:8080");
    assert_eq!(config.data_dir, PathBuf::from("./data"));
    assert!(config.database_url.is_none());
    assert_eq!(config.log_format, LogFormat::Text);
}

#[test]
fn layers_apply_in_order() {
    let f = file(
        r#"
bind = "127.0.0.1:9000"
body_limit = 2048
log = "debug"

[profile.test]
body_limit = 4096
request_timeout = "5s"
"#,
    );
    let config = load_with(
        Some(f.path()),
        &[("APP_ENV", "test"), ("UNHIDRA_LOG", "warn")],
    )
    .unwrap();
    assert_eq!(config.bind.port(), 9000, "file over default");
    assert_eq!(config.body_limit, 4096, "profile section over file");
    assert_eq!(config.request_timeout, HumanDuration::secs(5));
    assert_eq!(config.log, "warn", "environment over file");
    assert_eq!(config.log_format, LogFormat::Json, "test profile default");

    let flags = Layer {
        bind: Some("127.0.0.1:9100".parse().unwrap()),
        ..Layer::default()
    };
    let config = load(&Sources {
        file: Some(f.path().to_owned()),
        env: env(&[("UNHIDRA_BIND", "127.0.0.1:9200")]),
        flags,
    })
    .unwrap();
    assert_eq!(config.bind.port(), 9100, "flags over environment");
}

#[test]
fn unknown_key_names_file_key_and_line() {
    let f = file("bind = \"127.0.0.1:9000\"\n\nbogus_key = 1\n");
    let err = load_with(Some(f.path()), &[]).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ConfigError::File { .. }));
    assert!(text.contains(&f.path().display().to_string()), "{text}");
    assert!(text.contains("bogus_key"), "{text}");
    assert!(text.contains("line 3"), "{text}");
}

#[test]
fn unknown_key_in_profile_section_names_its_line() {
    let f = file("[profile.prod]\nbind = \"127.0.0.1:1\"\nnot_a_key = true\n");
    let text = load_with(Some(f.path()), &[]).unwrap_err().to_string();
    assert!(
        text.contains("not_a_key") && text.contains("line 3"),
        "{text}"
    );
}

#[test]
fn malformed_file_and_wrong_type_are_reported() {
    let f = file("bind = \n");
    let text = load_with(Some(f.path()), &[]).unwrap_err().to_string();
    assert!(text.contains("line 1"), "{text}");

    let f = file("body_limit = \"big\"\n");
    let text = load_with(Some(f.path()), &[]).unwrap_err().to_string();
    assert!(
        text.contains("body_limit") && text.contains("line 1"),
        "{text}"
    );

    let f = file("[profile.staging]\nlog = \"debug\"\n");
    let text = load_with(Some(f.path()), &[]).unwrap_err().to_string();
    assert!(text.contains("profile.staging"), "{text}");
}

#[test]
fn a_missing_named_file_is_an_error() {
    let err = load_with(Some(Path::new("/nonexistent/unhidra.toml")), &[]).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/unhidra.toml"));
}

#[test]
fn bad_and_unknown_environment_variables_are_named() {
    let p = problems(
        load_with(
            None,
            &[
                ("UNHIDRA_BODY_LIMIT", "lots"),
                ("UNHIDRA_DATABSE_URL", "postgres://x"),
            ],
        )
        .unwrap_err(),
    );
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(p.iter().any(|l| l.starts_with("UNHIDRA_BODY_LIMIT")));
    assert!(p.iter().any(|l| l.starts_with("UNHIDRA_DATABSE_URL")));

    let err = load_with(None, &[("APP_ENV", "staging")]).unwrap_err();
    assert!(err.to_string().contains("staging"));
}

#[test]
fn secrets_come_from_files_and_never_print() {
    let key = file("-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----\n");
    let config = load_with(
        None,
        &[
            ("UNHIDRA_SIGNING_KEY_FILE", key.path().to_str().unwrap()),
            ("UNHIDRA_METRICS_TOKEN", "tok-123"),
            (
                "UNHIDRA_DATABASE_URL",
                "postgres://app:pw-secret@127.0.0.1/db",
            ),
        ],
    )
    .unwrap();
    assert!(
        config
            .signing_key
            .as_ref()
            .unwrap()
            .expose()
            .ends_with("KEY-----")
    );
    let shown = format!("{config:?}");
    let json = serde_json::to_string(&config).unwrap();
    for secret in ["abc", "tok-123", "pw-secret"] {
        assert!(!shown.contains(secret), "{shown}");
        assert!(!json.contains(secret), "{json}");
    }

    let p = problems(
        load_with(
            None,
            &[("UNHIDRA_SIGNING_KEY_FILE", "/nonexistent/key.pem")],
        )
        .unwrap_err(),
    );
    assert!(p[0].contains("UNHIDRA_SIGNING_KEY_FILE"), "{p:?}");
}

#[test]
fn prod_refuses_insecure_settings_one_message_each() {
    let p = problems(
        load_with(
            None,
            &[("APP_ENV", "prod"), ("UNHIDRA_ALLOWED_ORIGINS", "*")],
        )
        .unwrap_err(),
    );
    assert_eq!(p.len(), 4, "{p:?}");
    assert!(p.iter().any(|l| l.starts_with("allowed_origins")), "{p:?}");
    assert!(p.iter().any(|l| l.starts_with("signing_key")), "{p:?}");
    assert!(p.iter().any(|l| l.starts_with("public_url")), "{p:?}");
    assert!(p.iter().any(|l| l.starts_with("metrics_token")), "{p:?}");

    let key = file("k");
    let token = file("a-metrics-token-of-some-length");
    let secure = [
        ("APP_ENV", "prod"),
        ("UNHIDRA_SIGNING_KEY_FILE", key.path().to_str().unwrap()),
        ("UNHIDRA_PUBLIC_URL", "https://unhidra.example.com"),
        ("UNHIDRA_ALLOWED_ORIGINS", "https://app.example.com"),
        ("UNHIDRA_METRICS_TOKEN_FILE", token.path().to_str().unwrap()),
    ];
    let config = load_with(None, &secure).unwrap();
    assert_eq!(config.profile, Profile::Prod);
    // Open metrics are allowed where accounts are not hidden anyway.
    let open = load_with(
        None,
        &[
            &secure[..4],
            &[("UNHIDRA_HIDE_EXISTING_ACCOUNTS", "false")][..],
        ]
        .concat(),
    )
    .unwrap();
    assert!(open.metrics_token.is_none());
}

#[test]
fn malformed_origins_are_refused() {
    let p = problems(
        load_with(
            None,
            &[(
                "UNHIDRA_ALLOWED_ORIGINS",
                "https://ok.example.com,https://x.example.com/path,not a url",
            )],
        )
        .unwrap_err(),
    );
    assert_eq!(p.len(), 2, "{p:?}");
}

#[test]
fn the_reauthentication_window_defaults_to_five_minutes_and_is_never_zero() {
    let config = load_with(None, &[]).unwrap();
    assert_eq!(config.reauth_window, HumanDuration::secs(5 * 60));
    let p = problems(load_with(None, &[("UNHIDRA_REAUTH_WINDOW", "0s")]).unwrap_err());
    assert_eq!(p, ["reauth_window: must be longer than zero"], "{p:?}");
}

#[test]
fn every_key_has_a_distinct_environment_variable() {
    let vars: BTreeSet<String> = KEYS.iter().map(KeyInfo::env_var).collect();
    assert_eq!(vars.len(), KEYS.len());
    for key in KEYS {
        assert!(
            !key.name.ends_with("_file"),
            "{} clashes with *_FILE",
            key.name
        );
    }
    let secrets: Vec<&str> = KEYS.iter().filter(|k| k.secret).map(|k| k.name).collect();
    assert_eq!(
        secrets,
        [
            "metrics_token",
            "signing_key",
            "smtp_url",
            "s3_secret_access_key",
            "admin_password"
        ]
    );
}

#[test]
fn a_reply_bound_must_fit_the_queue_bound() {
    let p = problems(
        load_with(
            None,
            &[
                ("UNHIDRA_WS_QUEUE_BYTES", "1048576"),
                ("UNHIDRA_WS_MAX_REPLY_BYTES", "2097152"),
            ],
        )
        .unwrap_err(),
    );
    assert!(
        p.iter().any(|p| p.starts_with("ws_max_reply_bytes:")),
        "{p:?}"
    );
    let p = problems(load_with(None, &[("UNHIDRA_WS_MAX_REPLY_BYTES", "1024")]).unwrap_err());
    assert!(
        p.iter().any(|p| p.starts_with("ws_max_reply_bytes:")),
        "{p:?}"
    );
    let fits = load_with(None, &[("UNHIDRA_WS_QUEUE_BYTES", "1048576")]).unwrap();
    assert_eq!(fits.ws_max_reply_bytes, fits.ws_queue_bytes);
}

#[test]
fn abuse_limits_have_checked_defaults() {
    let config = load_with(None, &[]).unwrap();
    assert_eq!(config.rate_limit_ipv6_prefix, 64);
    assert_eq!(config.rate_limit_login_ip_per_minute, 30);
    assert_eq!(
        (
            config.argon2_max_memory_kib,
            config.argon2_max_iterations,
            config.argon2_max_parallelism
        ),
        (262_144, 10, 8)
    );
    let p = problems(
        load_with(
            None,
            &[
                ("UNHIDRA_RATE_LIMIT_IPV6_PREFIX", "129"),
                ("UNHIDRA_RATE_LIMIT_MAX_KEYS", "0"),
                ("UNHIDRA_ARGON2_MAX_MEMORY_KIB", "512"),
            ],
        )
        .unwrap_err(),
    );
    assert_eq!(p.len(), 3, "{p:?}");
    assert!(
        p.iter().any(|l| l.starts_with("rate_limit_ipv6_prefix")),
        "{p:?}"
    );
    assert!(
        p.iter().any(|l| l.starts_with("rate_limit_max_keys")),
        "{p:?}"
    );
    assert!(p.iter().any(|l| l.starts_with("argon2_max_")), "{p:?}");
}

#[test]
fn job_queues_are_name_concurrency_pairs() {
    assert_eq!(
        crate::parse_job_queues(" default=10, mail=2 ").unwrap(),
        [("default".to_owned(), 10), ("mail".to_owned(), 2)]
    );
    assert_eq!(crate::parse_job_queues("").unwrap(), []);
    for bad in ["default", "a b=1", "x=0", "x=1001", "x=1,x=2", "=3"] {
        assert!(crate::parse_job_queues(bad).is_err(), "{bad}");
    }
    let p = problems(load_with(None, &[("UNHIDRA_JOBS_QUEUES", "default=lots")]).unwrap_err());
    assert!(p[0].starts_with("jobs_queues: "), "{p:?}");
}

#[test]
fn cron_schedules_are_entries_of_fields() {
    let entries = crate::parse_job_cron(
        "nightly | 0 3 * * * | Europe/Berlin | rooms.retention;\n\
         hourly|0 * * * *|UTC|report|skip|{\"a\": \"x|y\"}\n",
    )
    .unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0].name, "nightly");
    assert_eq!(entries[0].expression, "0 3 * * *");
    assert_eq!(entries[0].time_zone, "Europe/Berlin");
    assert_eq!(entries[0].kind, "rooms.retention");
    assert_eq!(entries[0].catch_up, "once");
    assert_eq!(entries[0].payload, "{}");
    assert_eq!(entries[1].catch_up, "skip");
    assert_eq!(entries[1].payload, r#"{"a": "x|y"}"#);
    assert_eq!(crate::parse_job_cron(" ; \n").unwrap(), []);
    for bad in [
        "nightly|0 3 * * *|UTC",
        "night ly|0 3 * * *|UTC|k",
        "n||UTC|k",
        "n|0 3 * * *||k",
        "n|0 3 * * *|UTC|a kind",
        "n|0 3 * * *|UTC|k|sometimes",
        "n|* * * * *|UTC|k;n|0 * * * *|UTC|k",
    ] {
        assert!(crate::parse_job_cron(bad).is_err(), "{bad}");
    }
    let p = problems(load_with(None, &[("UNHIDRA_JOBS_CRON", "nightly|0 3 * * *")]).unwrap_err());
    assert!(p[0].starts_with("jobs_cron: "), "{p:?}");
}

#[test]
fn the_s3_backend_needs_its_keys_and_its_secret_never_prints() {
    let err = load_with(None, &[("UNHIDRA_STORAGE_BACKEND", "s3")]).unwrap_err();
    let text = err.to_string();
    for key in [
        "s3_endpoint",
        "s3_bucket",
        "s3_access_key_id",
        "s3_secret_access_key",
    ] {
        assert!(text.contains(key), "{text}");
    }
    let err = load_with(None, &[("UNHIDRA_STORAGE_BACKEND", "ftp")]).unwrap_err();
    assert!(err.to_string().contains("expected local or s3"), "{err}");

    let config = load_with(
        None,
        &[
            ("UNHIDRA_STORAGE_BACKEND", "S3"),
            ("UNHIDRA_S3_ENDPOINT", "http://127.0.0.1:9000"),
            ("UNHIDRA_S3_BUCKET", "unhidra-files"),
            ("UNHIDRA_S3_ACCESS_KEY_ID", "AKIDEXAMPLE"),
            ("UNHIDRA_S3_SECRET_ACCESS_KEY", "s3-secret-value"),
            ("UNHIDRA_S3_PATH_STYLE", "false"),
        ],
    )
    .unwrap();
    assert_eq!(config.storage_backend, crate::StorageBackend::S3);
    assert!(!config.s3_path_style);
    assert_eq!(config.s3_region, "us-east-1");
    assert_eq!(
        config.s3_secret_access_key.as_ref().unwrap().expose(),
        "s3-secret-value"
    );
    let shown = format!("{config:?}");
    let json = serde_json::to_string(&config).unwrap();
    assert!(!shown.contains("s3-secret-value"), "{shown}");
    assert!(!json.contains("s3-secret-value"), "{json}");
}
