//! Value types that config keys are made of, and how each is read from an environment variable.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What `spec` and `Debug` print in place of a secret.
pub const REDACTED: &str = "[redacted]";

/// A value that can be given as an `UNHIDRA_*` environment variable.
///
/// TOML values go through serde; environment variables are plain strings, so each type says
/// how it reads one.
pub trait EnvValue: Sized {
    /// Parses the variable's text; the error says what was expected.
    fn parse_env(text: &str) -> Result<Self, String>;
}

impl EnvValue for String {
    fn parse_env(text: &str) -> Result<Self, String> {
        Ok(text.to_owned())
    }
}

impl EnvValue for u64 {
    fn parse_env(text: &str) -> Result<Self, String> {
        text.trim()
            .parse()
            .map_err(|_| format!("expected a whole number, got {text:?}"))
    }
}

impl EnvValue for u32 {
    fn parse_env(text: &str) -> Result<Self, String> {
        text.trim()
            .parse()
            .map_err(|_| format!("expected a whole number, got {text:?}"))
    }
}

impl EnvValue for bool {
    fn parse_env(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(format!("expected true or false, got {text:?}")),
        }
    }
}

impl EnvValue for SocketAddr {
    fn parse_env(text: &str) -> Result<Self, String> {
        text.trim()
            .parse()
            .map_err(|_| format!("expected an address such as 127.0.0.1:8080, got {text:?}"))
    }
}

impl EnvValue for PathBuf {
    fn parse_env(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("expected a path, got an empty value".into());
        }
        Ok(PathBuf::from(text))
    }
}

impl EnvValue for url::Url {
    fn parse_env(text: &str) -> Result<Self, String> {
        url::Url::parse(text.trim()).map_err(|e| format!("expected a URL: {e}"))
    }
}

/// A comma-separated list in the environment; an empty value is an empty list.
impl EnvValue for Vec<String> {
    fn parse_env(text: &str) -> Result<Self, String> {
        Ok(text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect())
    }
}

/// An empty variable unsets an optional key.
impl<T: EnvValue> EnvValue for Option<T> {
    fn parse_env(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            Ok(None)
        } else {
            T::parse_env(text).map(Some)
        }
    }
}

/// A secret: never printed, never serialised in clear.
#[derive(Clone)]
pub struct Secret(SecretString);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(SecretString::from(value.into()))
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret::new)
    }
}

impl EnvValue for Secret {
    fn parse_env(text: &str) -> Result<Self, String> {
        Ok(Secret::new(text))
    }
}

/// A duration written the human way: `30s`, `1m 30s`, `250ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// Whole seconds.
    pub const fn secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }

    /// Whole milliseconds.
    pub const fn millis(millis: u64) -> Self {
        Self(Duration::from_millis(millis))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse_env(&text).map_err(serde::de::Error::custom)
    }
}

impl EnvValue for HumanDuration {
    fn parse_env(text: &str) -> Result<Self, String> {
        humantime::parse_duration(text.trim())
            .map(Self)
            .map_err(|e| format!("expected a duration such as 30s or 2m, got {text:?} ({e})"))
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable lines for a terminal.
    Text,
    /// One JSON object per line, for collectors.
    Json,
}

impl EnvValue for LogFormat {
    fn parse_env(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(format!("expected text or json, got {text:?}")),
        }
    }
}

/// Where files' bytes are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// A folder: `<data_dir>/files`.
    Local,
    /// An S3-compatible object store (the `s3_*` keys).
    S3,
}

impl EnvValue for StorageBackend {
    fn parse_env(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "local" => Ok(Self::Local),
            "s3" => Ok(Self::S3),
            _ => Err(format!("expected local or s3, got {text:?}")),
        }
    }
}

/// When SQLite makes a commit durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SqliteSynchronous {
    /// A commit survives a crash of the process (WAL is written before the answer), but the
    /// last commits before a power loss or kernel crash may be lost; never corruption.
    Normal,
    /// A commit is on disk (fsync of the WAL) before it is acknowledged: it survives a power
    /// loss too, at the cost of one fsync per transaction.
    Full,
}

impl EnvValue for SqliteSynchronous {
    fn parse_env(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "normal" => Ok(Self::Normal),
            "full" => Ok(Self::Full),
            _ => Err(format!("expected normal or full, got {text:?}")),
        }
    }
}

/// A database URL; its password is redacted whenever it is shown.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// The URL with its password, for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether this URL selects PostgreSQL.
    pub fn is_postgres(&self) -> bool {
        self.0.starts_with("postgres://") || self.0.starts_with("postgresql://")
    }

    /// The URL with any password replaced, safe to log.
    pub fn redacted(&self) -> String {
        match url::Url::parse(&self.0) {
            Ok(mut url) if url.password().is_some() => {
                // Setting a password only fails on URLs that cannot have one.
                let _ = url.set_password(Some(REDACTED));
                url.to_string()
            }
            Ok(_) => self.0.clone(),
            Err(_) => REDACTED.to_owned(),
        }
    }

    fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let known = ["postgres://", "postgresql://", "sqlite:"];
        if known.iter().any(|p| text.starts_with(p)) {
            Ok(Self(text.to_owned()))
        } else {
            Err("expected a postgres://… or sqlite:… URL".to_owned())
        }
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for DatabaseUrl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

impl<'de> Deserialize<'de> for DatabaseUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl EnvValue for DatabaseUrl {
    fn parse_env(text: &str) -> Result<Self, String> {
        Self::parse(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_url_hides_password() {
        let url = DatabaseUrl::parse("postgres://app:hunter2@db:5432/unhidra").unwrap();
        assert!(!url.redacted().contains("hunter2"));
        assert!(!format!("{url:?}").contains("hunter2"));
        assert!(url.is_postgres());
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("s3cr3t");
        assert_eq!(format!("{s:?}"), REDACTED);
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            format!("\"{REDACTED}\"")
        );
        assert_eq!(s.expose(), "s3cr3t");
    }

    #[test]
    fn env_lists_and_durations() {
        assert_eq!(
            Vec::<String>::parse_env(" a, b ,,").unwrap(),
            vec!["a".to_owned(), "b".to_owned()]
        );
        assert_eq!(
            HumanDuration::parse_env("1m 30s").unwrap(),
            HumanDuration::secs(90)
        );
        assert!(u64::parse_env("ten").is_err());
        assert_eq!(Option::<u64>::parse_env("").unwrap(), None);
    }
}
