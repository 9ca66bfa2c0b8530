//! Unhidra's configuration: built-in defaults < `unhidra.toml` < the file's profile section <
//! `UNHIDRA_*` environment variables < command-line flags.
//!
//! This crate knows nothing of HTTP, SQL or logging; it turns text into a checked [`Config`] and
//! reports every problem it finds, each naming where it came from.

mod value;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use value::{
    DatabaseUrl, EnvValue, HumanDuration, LogFormat, REDACTED, Secret, SqliteSynchronous,
    StorageBackend,
};

/// The environment variable that selects the profile.
pub const PROFILE_VAR: &str = "APP_ENV";
/// The environment variable that names the config file, like `--config`.
pub const CONFIG_FILE_VAR: &str = "UNHIDRA_CONFIG";
/// The file read from the working directory when no other is named.
pub const DEFAULT_CONFIG_FILE: &str = "unhidra.toml";
/// Every key's environment variable starts with this.
pub const ENV_PREFIX: &str = "UNHIDRA_";
/// A variable named `UNHIDRA_<KEY>_FILE` gives the key's value as the contents of a file.
pub const FILE_SUFFIX: &str = "_FILE";

/// A deployment profile; it chooses defaults and how strict the checks are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// A developer's machine: readable logs, permissive CORS, a generated signing key.
    Dev,
    /// Automated tests: like dev, with JSON logs.
    Test,
    /// Production: JSON logs, and insecure settings are refused.
    Prod,
}

impl Profile {
    /// The profile's name as written in `APP_ENV` and in the file's `[profile.NAME]`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Dev => "dev",
            Self::Test => "test",
            Self::Prod => "prod",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "" | "dev" | "development" => Some(Self::Dev),
            "test" => Some(Self::Test),
            "prod" | "production" => Some(Self::Prod),
            _ => None,
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Declares every config key once: its type, its default per profile and whether it is secret.
///
/// From that one list come [`Config`], the partial [`Layer`] that a file, a profile section, the
/// environment or the command line contributes, and [`KEYS`].
macro_rules! config_keys {
    (
        |$profile:ident| {
            $(
                $(#[doc = $doc:literal])+
                $name:ident : $ty:ty = $default:expr, secret = $secret:literal;
            )+
        }
    ) => {
        /// The effective configuration. Secrets serialise redacted, so this can be shown as is.
        #[derive(Debug, Clone, Serialize)]
        pub struct Config {
            /// The profile these settings were resolved for.
            pub profile: Profile,
            $( $(#[doc = $doc])+ pub $name: $ty, )+
        }

        impl Config {
            /// The built-in defaults of a profile.
            pub fn defaults($profile: Profile) -> Self {
                Self { profile: $profile, $( $name: $default, )+ }
            }
        }

        /// Part of a configuration, as one source gives it; `None` leaves a key as it was.
        #[derive(Debug, Clone, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct Layer {
            $( $(#[doc = $doc])+ #[serde(default)] pub $name: Option<$ty>, )+
        }

        /// A config file: every key, and `[profile.NAME]` sections that override them.
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct FileLayer {
            $( #[serde(default)] $name: Option<$ty>, )+
            #[serde(default)]
            profile: BTreeMap<String, Layer>,
        }

        impl FileLayer {
            fn split(self) -> (Layer, BTreeMap<String, Layer>) {
                (Layer { $( $name: self.$name, )+ }, self.profile)
            }
        }

        impl Layer {
            /// Sets every key this layer gives.
            pub fn apply_to(self, config: &mut Config) {
                $( if let Some(value) = self.$name { config.$name = value; } )+
            }

            fn set_from_env(&mut self, key: &str, text: &str) -> Option<Result<(), String>> {
                match key {
                    $( stringify!($name) => Some(
                        <$ty as EnvValue>::parse_env(text).map(|v| self.$name = Some(v))
                    ), )+
                    _ => None,
                }
            }
        }

        /// Every key, with its environment variable, in declaration order.
        pub const KEYS: &[KeyInfo] = &[
            $( KeyInfo { name: stringify!($name), secret: $secret, doc: concat!($($doc),+) }, )+
        ];
    };
}

config_keys! {
    |profile| {
        /// Address and port the server listens on.
        bind: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8080)), secret = false;
        /// Folder for the embedded database, files and generated keys.
        data_dir: PathBuf = PathBuf::from("./data"), secret = false;
        /// `postgres://…` selects PostgreSQL; unset means SQLite at `<data_dir>/unhidra.db`.
        database_url: Option<DatabaseUrl> = None, secret = false;
        /// Size of the database connection pool.
        database_max_connections: u32 = 16, secret = false;
        /// When an SQLite commit counts as durable: `normal` survives a process crash, `full`
        /// also a power loss (one fsync per transaction). PostgreSQL follows its own
        /// `synchronous_commit`.
        sqlite_synchronous: SqliteSynchronous = SqliteSynchronous::Normal, secret = false;
        /// The URL users reach this server at (`https://…` turns on HSTS). Required in prod.
        public_url: Option<url::Url> = None, secret = false;
        /// Log filter, in `RUST_LOG` syntax.
        log: String = "info".to_owned(), secret = false;
        /// `text` for people, `json` for collectors.
        log_format: LogFormat = if profile == Profile::Dev { LogFormat::Text } else { LogFormat::Json },
            secret = false;
        /// Origins allowed by CORS; `*` allows any and is refused in prod.
        allowed_origins: Vec<String> = if profile == Profile::Prod { Vec::new() } else { vec!["*".to_owned()] },
            secret = false;
        /// Largest request body accepted, in bytes.
        body_limit: u64 = 1024 * 1024, secret = false;
        /// Longest time a request may take before it is answered with 408.
        request_timeout: HumanDuration = HumanDuration::secs(30), secret = false;
        /// Time in-flight requests get to finish after SIGTERM or SIGINT.
        shutdown_grace: HumanDuration = HumanDuration::secs(10), secret = false;
        /// Bearer token that `/metrics` requires; unset leaves it open.
        metrics_token: Option<Secret> = None, secret = true;
        /// PEM (PKCS#8) Ed25519 private key that signs access tokens; unset, one is generated and
        /// kept in the database (refused in prod).
        signing_key: Option<Secret> = None, secret = true;
        /// `iss` of access tokens; unset means the public URL, or `unhidra`.
        jwt_issuer: Option<String> = None, secret = false;
        /// `aud` of access tokens.
        jwt_audience: String = "unhidra".to_owned(), secret = false;
        /// Lifetime of an access token.
        access_token_ttl: HumanDuration = HumanDuration::secs(15 * 60), secret = false;
        /// Lifetime of each refresh token; every refresh issues a new one.
        refresh_token_ttl: HumanDuration = HumanDuration::secs(14 * 24 * 3600), secret = false;
        /// A used refresh token presented again within this time (a second tab retrying) gets
        /// the same successor instead of revoking the session; 0 turns this off.
        refresh_reuse_grace: HumanDuration = HumanDuration::secs(0), secret = false;
        /// Absolute lifetime of a login session, however often it is refreshed.
        session_max_age: HumanDuration = HumanDuration::secs(30 * 24 * 3600), secret = false;
        /// How recently a session's password must have been presented (at login or on
        /// `POST /api/v1/auth/reauthenticate`) for setting up, enabling or disabling TOTP.
        reauth_window: HumanDuration = HumanDuration::secs(5 * 60), secret = false;
        /// Argon2id memory cost in KiB (OWASP: at least 19456 in production).
        argon2_memory_kib: u32 = if profile == Profile::Prod { 19_456 } else { 1_024 }, secret = false;
        /// Argon2id passes over memory.
        argon2_iterations: u32 = if profile == Profile::Prod { 2 } else { 1 }, secret = false;
        /// Argon2id lanes.
        argon2_parallelism: u32 = 1, secret = false;
        /// Highest Argon2 memory cost in KiB a stored or imported hash may have: an import over
        /// it is refused, and a login against such a hash is refused without verifying it.
        argon2_max_memory_kib: u32 = 262_144, secret = false;
        /// Highest Argon2 iteration count a stored or imported hash may have.
        argon2_max_iterations: u32 = 10, secret = false;
        /// Highest Argon2 lane count a stored or imported hash may have.
        argon2_max_parallelism: u32 = 8, secret = false;
        /// Password hashes computed at once; 0 means one per CPU core.
        hash_workers: u32 = 0, secret = false;
        /// Fewest characters in a new password (at least 8).
        password_min_length: u32 = 15, secret = false;
        /// Lowest strength score (0–4, zxcvbn) of a new password.
        password_min_strength: u32 = 3, secret = false;
        /// Answer a registration with a taken email exactly like a new one, so that outsiders
        /// cannot learn which emails have accounts.
        hide_existing_accounts: bool = profile == Profile::Prod, secret = false;
        /// Consecutive failed logins that lock an account for a while (doubling each time it
        /// happens again); 0 never locks.
        lockout_threshold: u32 = 10, secret = false;
        /// Failed logins (wrong passwords and wrong second-factor codes) per minute allowed from
        /// one address for one account; the account itself is protected by the lockout.
        rate_limit_login_per_minute: u32 = 5, secret = false;
        /// Failed logins per minute allowed from one address across all accounts, which stops
        /// one address from spraying passwords over many accounts.
        rate_limit_login_ip_per_minute: u32 = 30, secret = false;
        /// IPv6 clients are limited per network of this many leading bits (a /64 is one
        /// subscriber); IPv4 clients per address.
        rate_limit_ipv6_prefix: u32 = 64, secret = false;
        /// Keys (addresses, accounts) each rate limit tracks at once on this node; past it, new
        /// keys share one bucket until old ones expire, so a flood makes limits stricter.
        rate_limit_max_keys: u32 = 50_000, secret = false;
        /// Registrations per hour allowed from one address.
        rate_limit_register_per_hour: u32 = 10, secret = false;
        /// Password-reset requests per hour allowed from one address, and for one account.
        rate_limit_reset_per_hour: u32 = 5, secret = false;
        /// Email-verification attempts per hour allowed from one address.
        rate_limit_verify_per_hour: u32 = 20, secret = false;
        /// Token refreshes per minute allowed from one address.
        rate_limit_refresh_per_minute: u32 = 60, secret = false;
        /// Addresses of reverse proxies whose `X-Forwarded-For` is believed; the client is the
        /// right-most address in it that is not one of them.
        trusted_proxies: Vec<String> = Vec::new(), secret = false;
        /// SMTP server for mail, `smtp://user:pass@host:587?tls=required` or `smtps://…:465`;
        /// unset, mail is written to `<data_dir>/outbox/` as `.eml` files.
        smtp_url: Option<Secret> = None, secret = true;
        /// Sender of Unhidra's mail.
        mail_from: String = "Unhidra <unhidra@localhost>".to_owned(), secret = false;
        /// Refuse logins until the email is verified.
        require_verified_email: bool = false, secret = false;
        /// Admins without TOTP may do nothing but enrol it.
        require_admin_mfa: bool = false, secret = false;
        /// Also write audit events as JSON lines to `<data_dir>/audit/audit.jsonl`.
        audit_file_enabled: bool = true, secret = false;
        /// Size at which the audit file is rotated, in bytes.
        audit_file_max_bytes: u64 = 10 * 1024 * 1024, secret = false;
        /// Rotated audit files kept.
        audit_file_max_files: u32 = 10, secret = false;
        /// Rotated audit files older than this are deleted.
        audit_file_max_age: HumanDuration = HumanDuration::secs(90 * 24 * 3600), secret = false;
        /// Shorten client addresses in the audit log to their network (/24 or /48). Events name
        /// users by id, never by email.
        audit_minimise: bool = profile == Profile::Prod, secret = false;
        /// Largest WebSocket frame (and message) accepted, in bytes; larger ones close with 1009.
        ws_max_frame_bytes: u64 = 64 * 1024, secret = false;
        /// Frames queued for one WebSocket client; a client that falls this far behind is
        /// closed with 1013.
        ws_queue_frames: u32 = 256, secret = false;
        /// Bytes queued for one WebSocket client (frames being written count once more); a
        /// client whose queue would grow past it is closed with 1013 and what waits for it is
        /// dropped.
        ws_queue_bytes: u64 = 4 * 1024 * 1024, secret = false;
        /// Largest `history` reply (and `resume` replay per room) in encoded bytes; a reply cut
        /// short says `more: true`. At least 128 KiB (one message of the largest size), at most
        /// `ws_queue_bytes`.
        ws_max_reply_bytes: u64 = 1024 * 1024, secret = false;
        /// How long a WebSocket client found behind at its last write (8 frames or more in it,
        /// or a socket that pushed back) waits before its next write (up to three times as long
        /// for a very large backlog), so that frames arriving meanwhile go out together. Else the
        /// next write goes as soon as the last completed; `0s` never waits.
        ws_write_coalesce: HumanDuration = HumanDuration::millis(20), secret = false;
        /// New WebSocket connections per minute from one address.
        rate_limit_ip_per_minute: u32 = 60, secret = false;
        /// New WebSocket connections per minute for one user.
        rate_limit_user_per_minute: u32 = 30, secret = false;
        /// Frames per second one WebSocket connection may send (a token bucket of that size).
        rate_limit_messages_per_sec: u32 = 50, secret = false;
        /// Concurrent WebSocket connections of people from one address.
        ws_max_connections_per_ip: u32 = 200, secret = false;
        /// Concurrent device connections from one address: a site's devices often share one
        /// (NAT). Devices count apart from people, and each has its key.
        ws_max_device_connections_per_ip: u32 = 10_000, secret = false;
        /// New device connections per minute from one address.
        rate_limit_device_ip_per_minute: u32 = 1200, secret = false;
        /// Device-key attempts that fail (unknown, revoked, malformed) per minute from one
        /// address; past it a wrong key from the address gets 429 instead of 401 (a good key passes).
        device_auth_failures_per_minute: u32 = 30, secret = false;
        /// `event` frames one device may send per minute (past it: an error frame, nothing stored).
        device_events_per_minute: u32 = 60, secret = false;
        /// A PEM file of the Ed25519 public keys whose firmware manifests are trusted (several
        /// for rotation); unset: firmware uploads are refused.
        ota_trusted_keys: Option<PathBuf> = None, secret = false;
        /// The largest firmware image, in bytes.
        ota_max_image_bytes: u64 = 16 * 1024 * 1024, secret = false;
        /// The largest uploaded file, in bytes; a body that passes it is refused as it streams.
        files_max_bytes: u64 = 50 * 1024 * 1024, secret = false;
        /// Bytes of files one user may keep (an admin may set a user's own). `0`: no limit.
        files_quota_bytes: u64 = 1024 * 1024 * 1024, secret = false;
        /// Files one user may keep. `0`: no limit.
        files_quota_files: u64 = 10_000, secret = false;
        /// Bytes of files one admin may keep. `0`: no limit.
        files_admin_quota_bytes: u64 = 0, secret = false;
        /// Files one admin may keep. `0`: no limit.
        files_admin_quota_files: u64 = 0, secret = false;
        /// How long a signed link to a file works when its maker names no `ttl` (60 s to 7 d).
        files_link_ttl: HumanDuration = HumanDuration::secs(3600), secret = false;
        /// Where files' bytes are kept: `local` (a folder, `<data_dir>/files`) or `s3` (any
        /// S3-compatible object store; the `s3_*` keys).
        storage_backend: StorageBackend = StorageBackend::Local, secret = false;
        /// The S3 endpoint, e.g. `https://s3.eu-west-1.amazonaws.com` or a MinIO's URL.
        s3_endpoint: Option<url::Url> = None, secret = false;
        /// The bucket files are kept in (it must exist).
        s3_bucket: Option<String> = None, secret = false;
        /// The bucket's region (signed into every request).
        s3_region: String = "us-east-1".to_owned(), secret = false;
        /// The access key id requests are signed with.
        s3_access_key_id: Option<String> = None, secret = false;
        /// The secret access key requests are signed with.
        s3_secret_access_key: Option<Secret> = None, secret = true;
        /// Path-style URLs (`<endpoint>/<bucket>/<key>`, as MinIO and most self-hosted stores
        /// want); `false`: virtual-host style (`<bucket>.<endpoint host>/<key>`).
        s3_path_style: bool = true, secret = false;
        /// How long a signed firmware download link works (the offer a device gets carries one).
        ota_link_ttl: HumanDuration = HumanDuration::secs(3600), secret = false;
        /// How often each node moves deployments on: starts those due, fails devices past their
        /// deadline, makes the offers owed, advances stages.
        ota_tick_interval: HumanDuration = HumanDuration::secs(5), secret = false;
        /// How often an idle WebSocket is pinged; one that stays silent for two intervals is
        /// closed.
        ws_ping_interval: HumanDuration = HumanDuration::secs(30), secret = false;
        /// How often room retention is applied (a background job, once across every node).
        retention_interval: HumanDuration = HumanDuration::secs(60), secret = false;
        /// The job queues this node works, each `name=concurrency`, comma-separated; empty:
        /// this node runs no jobs (it still enqueues them).
        jobs_queues: String = "default=10".to_owned(), secret = false;
        /// How long a claimed job stays this node's without a renewal (renewed every third of
        /// it): the jobs of a node killed mid-job are retried elsewhere once it ends.
        jobs_lease: HumanDuration = HumanDuration::secs(30), secret = false;
        /// How often an idle job queue looks for due jobs that nothing woke it for (jobs
        /// scheduled for later, or enqueued on another node while PostgreSQL's notification
        /// of it was missed).
        jobs_poll_interval: HumanDuration = HumanDuration::secs(1), secret = false;
        /// How long finished jobs are kept before they are pruned.
        jobs_retention: HumanDuration = HumanDuration::secs(7 * 24 * 3600), secret = false;
        /// Cron schedules stored at start, separated by `;` or line breaks, each
        /// `name|expression|time_zone|kind[|once or skip[|payload]]`: a job of `kind` (with the
        /// JSON `payload`, `{}` if none) at every tick of the five-field `expression` read in
        /// the IANA `time_zone`; `once` (the default) runs the latest of the ticks missed while
        /// every node was down, `skip` none. The API cannot change these names.
        jobs_cron: String = String::new(), secret = false;
        /// Failed job attempts against one dependency (SMTP) within `breaker_window` that open
        /// its circuit: its jobs then wait instead of using up their attempts.
        breaker_failures: u32 = 5, secret = false;
        /// How far back a dependency's failures count towards opening its circuit.
        breaker_window: HumanDuration = HumanDuration::secs(60), secret = false;
        /// How long an open circuit holds its jobs back before one runs as a probe.
        breaker_open_for: HumanDuration = HumanDuration::secs(30), secret = false;
        /// A device that sends nothing (no frame, heartbeat or batch) for this long is silent
        /// and gets an alert, unless its model or itself has a timeout of its own.
        device_inactivity_timeout: HumanDuration = HumanDuration::secs(120), secret = false;
        /// Inactivity timeouts per model, `model=seconds`, comma-separated (10 s to 30 days).
        device_model_timeouts: String = String::new(), secret = false;
        /// How long a device's old keys keep working after a rotation.
        device_key_grace: HumanDuration = HumanDuration::secs(24 * 3600), secret = false;
        /// How often devices' last-seen times and heartbeats are written (status changes are
        /// written at once). At most half the shortest inactivity timeout.
        device_presence_flush: HumanDuration = HumanDuration::secs(5), secret = false;
        /// Device registrations per hour for one user, and for one address.
        device_registrations_per_hour: u32 = 30, secret = false;
        /// Device claims (`POST /api/v1/devices/claim`, successful or not) per hour from one
        /// address.
        device_claims_per_hour: u32 = 60, secret = false;
        /// Who is mailed when a device goes silent, comma-separated: `owner` (the device's
        /// owner) and addresses; empty: nobody.
        device_alert_mail: String = String::new(), secret = false;
        /// Points in one telemetry batch at most.
        telemetry_max_points: u32 = 1000, secret = false;
        /// Distinct telemetry keys one device may store.
        telemetry_max_keys: u32 = 256, secret = false;
        /// Bytes of one telemetry value at most (a string, an array's packed data).
        telemetry_max_value_bytes: u64 = 16 * 1024, secret = false;
        /// Telemetry batches one device may send per minute.
        telemetry_batches_per_minute: u32 = 600, secret = false;
        /// Bytes of telemetry one device may store per day (UTC), counted as its keys and values
        /// plus 24 bytes a point; past it batches are refused until the next day. `0`: no limit.
        telemetry_bytes_per_day: u64 = 512 * 1024 * 1024, secret = false;
        /// Bytes of telemetry one owner's devices may store per day (UTC) together, counted as
        /// for `telemetry_bytes_per_day`, so that many devices do not multiply one user's
        /// budget. `0`: no limit.
        telemetry_bytes_per_owner_per_day: u64 = 8 * 1024 * 1024 * 1024, secret = false;
        /// How far ahead of the server's clock a point's time may be; later points are refused.
        telemetry_max_future: HumanDuration = HumanDuration::secs(300), secret = false;
        /// How long telemetry is kept (pruned hourly); older points are refused. A device's
        /// batch numbers are remembered as long, so a repeat within it is never stored twice.
        telemetry_retention: HumanDuration = HumanDuration::secs(30 * 24 * 3600), secret = false;
        /// With `admin_password`, makes sure this admin exists at start.
        admin_email: Option<String> = None, secret = false;
        /// The first admin's password, used only if the admin does not exist yet.
        admin_password: Option<Secret> = None, secret = true;
    }
}

/// What `spec` and the docs know of a key.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct KeyInfo {
    /// Its name in `unhidra.toml`.
    pub name: &'static str,
    /// Whether its value is redacted wherever it is shown.
    pub secret: bool,
    /// One sentence on what it does.
    pub doc: &'static str,
}

impl KeyInfo {
    /// The environment variable that sets it: `UNHIDRA_` and the name in capitals.
    pub fn env_var(&self) -> String {
        format!("{ENV_PREFIX}{}", self.name.to_ascii_uppercase())
    }
}

/// Where the configuration comes from. Tests build one by hand; the binary reads the process.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The file named by `--config`; it must exist.
    pub file: Option<PathBuf>,
    /// The environment, as name → value.
    pub env: BTreeMap<String, String>,
    /// Flags given on the command line; they win over everything else.
    pub flags: Layer,
}

impl Sources {
    /// The process's environment and the given flags.
    pub fn from_process(file: Option<PathBuf>, flags: Layer) -> Self {
        Self {
            file,
            env: std::env::vars().collect(),
            flags,
        }
    }
}

/// Why a configuration could not be used. Each line of the message is one problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read or parsed; the message names the file, key and line.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and column where known.
        message: String,
    },
    /// One or more settings are wrong or refused by the profile.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

/// Resolves the configuration from its sources and checks it.
pub fn load(sources: &Sources) -> Result<Config, ConfigError> {
    let profile_text = sources
        .env
        .get(PROFILE_VAR)
        .map(String::as_str)
        .unwrap_or("");
    let profile = Profile::parse(profile_text).ok_or_else(|| {
        ConfigError::Invalid(vec![format!(
            "{PROFILE_VAR}={profile_text:?} is not a profile; use dev, test or prod"
        )])
    })?;
    let mut config = Config::defaults(profile);

    if let Some(path) = config_file(sources) {
        let (base, profiles) = read_file(&path)?;
        base.apply_to(&mut config);
        if let Some(section) = profiles.get(profile.name()) {
            section.clone().apply_to(&mut config);
        }
        if let Some(unknown) = profiles
            .keys()
            .find(|name| !["dev", "test", "prod"].contains(&name.as_str()))
        {
            return Err(ConfigError::File {
                path,
                message: format!("[profile.{unknown}] is not a profile; use dev, test or prod"),
            });
        }
    }

    env_layer(&sources.env)?.apply_to(&mut config);
    sources.flags.clone().apply_to(&mut config);
    check(&config)?;
    Ok(config)
}

fn config_file(sources: &Sources) -> Option<PathBuf> {
    if let Some(path) = &sources.file {
        return Some(path.clone());
    }
    if let Some(path) = sources.env.get(CONFIG_FILE_VAR).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let default = PathBuf::from(DEFAULT_CONFIG_FILE);
    default.is_file().then_some(default)
}

/// Reads a config file: its top-level keys and its `[profile.NAME]` sections.
fn read_file(path: &Path) -> Result<(Layer, BTreeMap<String, Layer>), ConfigError> {
    let file_error = |message: String| ConfigError::File {
        path: path.to_owned(),
        message: message.trim_end().to_owned(),
    };
    let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
    // The typed parse reports an unknown key or a wrong value with its line and column.
    let file: FileLayer =
        toml::from_str(&text).map_err(|e: toml::de::Error| file_error(e.to_string()))?;
    Ok(file.split())
}

/// Reads every `UNHIDRA_*` variable. An unknown one is an error: a misspelt
/// `UNHIDRA_DATABSE_URL` must not silently leave production on the embedded store.
fn env_layer(env: &BTreeMap<String, String>) -> Result<Layer, ConfigError> {
    let mut layer = Layer::default();
    let mut problems = Vec::new();
    for (var, value) in env.range(ENV_PREFIX.to_owned()..) {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            break;
        };
        if var == CONFIG_FILE_VAR {
            continue;
        }
        let (key, text) = match rest.strip_suffix(FILE_SUFFIX) {
            Some(key) if is_key(key) => match std::fs::read_to_string(value) {
                // A trailing newline is how editors and `echo` end files, never part of a secret.
                Ok(text) => (key, text.trim_end_matches(['\n', '\r']).to_owned()),
                Err(e) => {
                    problems.push(format!("{var}: cannot read {value}: {e}"));
                    continue;
                }
            },
            _ => (rest, value.clone()),
        };
        let key = key.to_ascii_lowercase();
        match layer.set_from_env(&key, &text) {
            Some(Ok(())) => {}
            Some(Err(why)) => problems.push(format!("{var}: {why}")),
            None => problems.push(format!(
                "{var} is not a setting of Unhidra (see `unhidra spec` for the known keys)"
            )),
        }
    }
    if problems.is_empty() {
        Ok(layer)
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

fn is_key(upper: &str) -> bool {
    KEYS.iter().any(|k| k.name.eq_ignore_ascii_case(upper))
}

/// Checks what no single value can show: consistency, and what the profile refuses.
fn check(config: &Config) -> Result<(), ConfigError> {
    let mut problems = Vec::new();
    for origin in &config.allowed_origins {
        if origin != "*" && !is_origin(origin) {
            problems.push(format!(
                "allowed_origins: {origin:?} is not an origin such as https://app.example.com"
            ));
        }
    }
    if let Some(url) = &config.public_url
        && !matches!(url.scheme(), "http" | "https")
    {
        problems.push(format!(
            "public_url: {url} must be an http:// or https:// URL"
        ));
    }
    if config.body_limit == 0 {
        problems.push("body_limit: must be at least 1 byte".to_owned());
    }
    if config.database_max_connections == 0 {
        problems.push("database_max_connections: must be at least 1".to_owned());
    }
    if config.request_timeout.0.is_zero() {
        problems.push("request_timeout: must be longer than zero".to_owned());
    }
    if config.reauth_window.0.is_zero() {
        // Zero would refuse every second-factor change, however fresh the password.
        problems.push("reauth_window: must be longer than zero".to_owned());
    }
    if config.password_min_length < 8 {
        problems.push("password_min_length: must be at least 8".to_owned());
    }
    if config.password_min_strength > 4 {
        problems.push("password_min_strength: the scale ends at 4".to_owned());
    }
    if config.argon2_memory_kib < 8 * config.argon2_parallelism.max(1)
        || config.argon2_iterations == 0
        || config.argon2_parallelism == 0
    {
        problems.push(
            "argon2_*: memory must be at least 8 KiB per lane, iterations and lanes at least 1"
                .to_owned(),
        );
    }
    if config.argon2_memory_kib > config.argon2_max_memory_kib
        || config.argon2_iterations > config.argon2_max_iterations
        || config.argon2_parallelism > config.argon2_max_parallelism
    {
        problems.push(
            "argon2_max_*: the ceiling must not be below the cost of new hashes (argon2_*)"
                .to_owned(),
        );
    }
    if let Err(why) = parse_job_queues(&config.jobs_queues) {
        problems.push(format!("jobs_queues: {why}"));
    }
    if let Err(why) = parse_job_cron(&config.jobs_cron) {
        problems.push(format!("jobs_cron: {why}"));
    }
    if config.jobs_lease.0 < std::time::Duration::from_secs(1) {
        problems.push("jobs_lease: at least 1s".to_owned());
    }
    if !(1..=10_000).contains(&config.breaker_failures) {
        problems.push("breaker_failures: 1 to 10000".to_owned());
    }
    let day = std::time::Duration::from_secs(24 * 3600);
    for (key, value) in [
        ("breaker_window", config.breaker_window.0),
        ("breaker_open_for", config.breaker_open_for.0),
    ] {
        if value.is_zero() || value > day {
            problems.push(format!("{key}: more than 0s and at most 1d"));
        }
    }
    if config.ota_link_ttl.0 < std::time::Duration::from_secs(60) || config.ota_link_ttl.0 > 7 * day
    {
        problems.push("ota_link_ttl: at least 1m and at most 7d".to_owned());
    }
    if config.ota_tick_interval.0 < std::time::Duration::from_millis(10)
        || config.ota_tick_interval.0 > std::time::Duration::from_secs(3600)
    {
        problems.push("ota_tick_interval: at least 10ms and at most 1h".to_owned());
    }
    if config.jobs_poll_interval.0.is_zero() {
        problems.push("jobs_poll_interval: more than 0s".to_owned());
    }
    if config.rate_limit_ipv6_prefix > 128 {
        problems.push("rate_limit_ipv6_prefix: an IPv6 prefix has at most 128 bits".to_owned());
    }
    if config.rate_limit_max_keys == 0 {
        problems.push("rate_limit_max_keys: must be at least 1".to_owned());
    }
    for proxy in &config.trusted_proxies {
        if proxy.parse::<std::net::IpAddr>().is_err() {
            problems.push(format!("trusted_proxies: {proxy:?} is not an IP address"));
        }
    }
    if config.ws_max_reply_bytes < 128 * 1024 || config.ws_max_reply_bytes > config.ws_queue_bytes {
        problems.push(
            "ws_max_reply_bytes: must be at least 128 KiB and at most ws_queue_bytes".to_owned(),
        );
    }
    if config.storage_backend == StorageBackend::S3 {
        let missing: Vec<&str> = [
            ("s3_endpoint", config.s3_endpoint.is_none()),
            (
                "s3_bucket",
                config.s3_bucket.as_deref().is_none_or(str::is_empty),
            ),
            (
                "s3_access_key_id",
                config.s3_access_key_id.as_deref().is_none_or(str::is_empty),
            ),
            (
                "s3_secret_access_key",
                config.s3_secret_access_key.is_none(),
            ),
        ]
        .into_iter()
        .filter_map(|(key, absent)| absent.then_some(key))
        .collect();
        if !missing.is_empty() {
            problems.push(format!(
                "storage_backend = \"s3\" needs {}",
                missing.join(", ")
            ));
        }
        if let Some(url) = &config.s3_endpoint
            && (!matches!(url.scheme(), "http" | "https") || url.host_str().is_none())
        {
            problems.push("s3_endpoint: an http:// or https:// URL with a host".to_owned());
        }
        if config.s3_region.trim().is_empty() {
            problems.push("s3_region: must not be empty".to_owned());
        }
    }
    if config.admin_email.is_some() != config.admin_password.is_some() {
        problems.push("admin_email and admin_password: give both or neither".to_owned());
    }
    if config.profile == Profile::Prod {
        if config.argon2_memory_kib < 19_456 || config.argon2_iterations < 2 {
            problems.push(
                "argon2_memory_kib/argon2_iterations: prod needs at least OWASP's 19456 KiB \
                 and 2 iterations"
                    .to_owned(),
            );
        }
        if config.signing_key.is_none() {
            problems.push(
                "signing_key: prod refuses a generated signing key; set UNHIDRA_SIGNING_KEY_FILE"
                    .to_owned(),
            );
        }
        if config.allowed_origins.iter().any(|o| o == "*") {
            problems.push(
                "allowed_origins: prod refuses `*`; list the origins of your web clients"
                    .to_owned(),
            );
        }
        if config.public_url.is_none() {
            problems.push(
                "public_url: prod needs the URL users reach this server at (UNHIDRA_PUBLIC_URL)"
                    .to_owned(),
            );
        }
        if config.hide_existing_accounts && config.metrics_token.is_none() {
            problems.push(
                "metrics_token: prod hides which emails have accounts, and open metrics would \
                 tell (login failures by reason, users); set UNHIDRA_METRICS_TOKEN_FILE"
                    .to_owned(),
            );
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

/// Reads `jobs_queues`: `name=concurrency` pairs, comma-separated (names of ASCII letters,
/// digits, `.`, `_` and `-`; 1 to 1000 at once; each name once); empty for none.
pub fn parse_job_queues(text: &str) -> Result<Vec<(String, u32)>, String> {
    let mut queues: Vec<(String, u32)> = Vec::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (name, concurrency) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?} is not name=concurrency"))?;
        let name = name.trim();
        let valid = !name.is_empty()
            && name.len() <= 200
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !valid {
            return Err(format!("{name:?} is not a queue name"));
        }
        let concurrency: u32 = concurrency
            .trim()
            .parse()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| format!("{item:?}: a concurrency is 1 to 1000"))?;
        if queues.iter().any(|(n, _)| n == name) {
            return Err(format!("{name:?} is named twice"));
        }
        queues.push((name.to_owned(), concurrency));
    }
    Ok(queues)
}

/// One cron schedule of `jobs_cron`, read but not yet checked as cron: the jobs service checks
/// the expression, the time zone, the kind and the payload at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronEntry {
    /// The schedule's name.
    pub name: String,
    /// Its five-field cron expression.
    pub expression: String,
    /// The IANA time zone the expression is read in.
    pub time_zone: String,
    /// The job kind each tick enqueues.
    pub kind: String,
    /// `once` or `skip`: what to do with ticks missed while every node was down.
    pub catch_up: String,
    /// The JSON payload of each tick's job, as written (`{}` if none was).
    pub payload: String,
}

/// Reads `jobs_cron`: schedules separated by `;` or line breaks, each
/// `name|expression|time_zone|kind[|once or skip[|payload]]` (names and kinds of ASCII
/// letters, digits, `.`, `_` and `-`, a name at most 100 bytes and given once; the payload is
/// the rest of the entry, so it may hold `|` but not `;`); empty for none.
pub fn parse_job_cron(text: &str) -> Result<Vec<CronEntry>, String> {
    let name_like = |text: &str, max: usize| {
        !text.is_empty()
            && text.len() <= max
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    let mut entries: Vec<CronEntry> = Vec::new();
    for item in text
        .split([';', '\n'])
        .map(str::trim)
        .filter(|i| !i.is_empty())
    {
        let fields: Vec<&str> = item.splitn(6, '|').map(str::trim).collect();
        let [name, expression, time_zone, kind, rest @ ..] = fields.as_slice() else {
            return Err(format!(
                "{item:?} is not name|expression|time_zone|kind[|once or skip[|payload]]"
            ));
        };
        if !name_like(name, 100) {
            return Err(format!("{name:?} is not a schedule name"));
        }
        if expression.is_empty() || time_zone.is_empty() {
            return Err(format!("{name}: an expression and a time zone are needed"));
        }
        if !name_like(kind, 200) {
            return Err(format!("{name}: {kind:?} is not a job kind"));
        }
        let catch_up = rest.first().copied().unwrap_or("once");
        if !matches!(catch_up, "once" | "skip") {
            return Err(format!("{name}: {catch_up:?} is neither once nor skip"));
        }
        let payload = rest
            .get(1)
            .copied()
            .filter(|p| !p.is_empty())
            .unwrap_or("{}");
        if entries.iter().any(|e| e.name == *name) {
            return Err(format!("{name:?} is named twice"));
        }
        entries.push(CronEntry {
            name: (*name).to_owned(),
            expression: (*expression).to_owned(),
            time_zone: (*time_zone).to_owned(),
            kind: (*kind).to_owned(),
            catch_up: catch_up.to_owned(),
            payload: payload.to_owned(),
        });
    }
    Ok(entries)
}

/// `scheme://host[:port]` with nothing after it, as browsers send in `Origin`.
fn is_origin(text: &str) -> bool {
    match url::Url::parse(text) {
        Ok(url) => {
            matches!(url.scheme(), "http" | "https")
                && url.host().is_some()
                && url.path() == "/"
                && !text.ends_with('/')
                && url.query().is_none()
                && url.fragment().is_none()
                && url.username().is_empty()
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests;
